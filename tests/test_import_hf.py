"""python -m moa_jax.import_hf: a random LlamaForCausalLM made here by transformers becomes a moa_jax run whose
logits at step 0 equal the Llama's (fp32, 1e-4) as swiglu, bila and bimoa, and which trains on."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip("torch", reason="needs the hf extra (torch, transformers): pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A 2-layer Llama (GQA, untied) with random weights and a byte-level BPE of its vocabulary."""
  import tokenizers

  out = tmp_path_factory.mktemp("llama")
  config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=10_000.0, tie_word_embeddings=False, hidden_act="silu")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(out)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=["</s>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.getcwd())\n" * 50], trainer)
  tok.save(str(out / "tokenizer.json"))
  return out


@pytest.mark.parametrize("ffn", ["swiglu", pytest.param("bila", marks=pytest.mark.slow), "bimoa"])
def test_logits_equal_the_llama_at_step_zero(llama_dir, tmp_path, data_cache, monkeypatch, ffn):
  from moa_jax import import_hf, rundir

  monkeypatch.setenv("MOA_JAX_CACHE", data_cache)
  workdir = str(tmp_path / "run")
  r = import_hf.import_model(str(llama_dir), ffn, workdir, size="debug")
  run, params, step = rundir.restore(workdir)
  assert step == 0 and run.config.model.ffn.mix == {"swiglu": "fixed", "bila": "la", "bimoa": "moa"}[ffn]
  tokens = np.random.default_rng(0).integers(0, 384, (2, 24), dtype=np.int32)
  ours = np.asarray(run.model.apply({"params": params}, jnp.asarray(tokens)))          # (B, T, V)
  model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(ours - theirs)) < 1e-4, np.max(np.abs(ours - theirs))
  assert np.std(theirs) > 1e-2  # the comparison is not between two near-constant outputs
  assert os.path.exists(os.path.join(workdir, "tokenizer.json")) and r["config"] == os.path.join(workdir, "config.py")


@pytest.mark.slow
def test_the_imported_run_trains_on_from_step_zero(llama_dir, tmp_path, data_cache):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "MOA_JAX_CACHE": data_cache, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "moa_jax.import_hf", f"--model={llama_dir}", "--ffn=bimoa",
                        f"--workdir={workdir}", "--size=debug"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"python -m moa_jax.train --config={workdir}/config.py --workdir={workdir}" in out.stdout
  out = subprocess.run([sys.executable, "-m", "moa_jax.train", f"--config={workdir}/config.py",
                        f"--workdir={workdir}", "--config.train.steps=3", "--config.train.log_every=1",
                        "--config.train.eval_every=0", "--config.train.sample_every=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  from moa_jax import rundir
  losses = {r["step"]: r["loss"] for r in rundir.records(workdir)}
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
  assert "note: train.steps 200 -> 3" in out.stdout  # restored from the step-0 checkpoint, then trained on
  refused = subprocess.run([sys.executable, "-m", "moa_jax.import_hf", f"--model={llama_dir}", "--ffn=geglu",
                            f"--workdir={tmp_path / 'other'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode == 1 and refused.stderr.startswith("error: --ffn=geglu with hidden_act = 'silu'")
