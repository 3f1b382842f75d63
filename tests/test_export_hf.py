"""python -m moa_jax.export_hf: the exported Hugging Face model computes moa_jax's logits (fp32, 1e-4).

Checkpoints are debug-size models with their initial parameters perturbed by noise (so norms, MoA gate
weights and every projection are non-trivial), saved as the trainer saves them. The comparisons need
torch + transformers (`pip install -e ".[hf]"`) and skip without them; the refusals do not.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import checkpoint, export_hf, presets, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def make_checkpoint(workdir, data_cache, ffn="swiglu", size="debug", step=3, **model):
  """Saves a perturbed initial state of a debug model at `step`, with its config, as training does."""
  c = presets.lm_config(size, ffn)
  c.data.cache_dir = data_cache
  c.data.max_bytes = 400_000
  c.train.batch_size = 2
  for key, value in model.items():
    target = c.model.ffn if key in c.model.ffn else c.model
    target[key] = value
  run = train.build(c)
  state = train.init_state(run)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [p + 0.3 * jnp.std(p) * jax.random.normal(k, p.shape) + 0.05 * jax.random.normal(k, p.shape)
           for p, k in zip(leaves, keys)]
  state = train.TrainState(state.step, jax.tree.unflatten(tree, noisy), state.opt_state)
  ckpt = checkpoint.Checkpoints(str(workdir), c.checkpoint.every, c.checkpoint.keep)
  ckpt.save(step, state, {}, {"step": step, "config": json.loads(c.to_json_best_effort())})
  ckpt.wait()
  ckpt.close()
  return run, state.params


def cli(*args):
  return subprocess.run([sys.executable, "-m", "moa_jax.export_hf", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """torch + transformers, offline, with remote-code modules cached under a temporary directory."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))  # read at import
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def moa_and_hf_logits(hf, run, params, out, trust_remote_code=False):
  torch, transformers = hf
  tokens = np.random.default_rng(0).integers(0, run.model.spec.vocab_size, (2, 24), dtype=np.int32)
  ours = np.asarray(run.model.apply({"params": params}, jnp.asarray(tokens)))              # (B, T, V)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust_remote_code,
                                                            dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  return model, ours, theirs


@pytest.mark.parametrize("ffn,model", [
    ("swiglu", {}),                                             # tied, GQA (4 query heads, 2 kv heads)
    pytest.param("geglu", {"tie_embeddings": False, "n_kv_heads": 4}, marks=pytest.mark.slow),  # untied, MHA
    pytest.param("reglu", {"n_kv_heads": 1, "rope_theta": 500_000.0}, marks=pytest.mark.slow),  # MQA, RoPE base
])
def test_dense_glu_is_llama_with_equal_logits(hf, tmp_path, data_cache, ffn, model):
  run, params = make_checkpoint(tmp_path / "run", data_cache, ffn, **model)
  out = str(tmp_path / "hf")
  r = export_hf.export(str(tmp_path / "run"), out)
  assert r["architecture"] == "LlamaForCausalLM" and r["step"] == 3
  assert not os.path.exists(os.path.join(out, "modeling_moa_llama.py"))
  hf_model, ours, theirs = moa_and_hf_logits(hf, run, params, out)
  assert type(hf_model).__name__ == "LlamaForCausalLM"
  assert hf_model.config.hidden_act == {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "reglu": "relu"}[ffn]
  assert np.max(np.abs(ours - theirs)) < TOL, np.max(np.abs(ours - theirs))
  n_params = sum(p.numel() for p in hf_model.parameters())
  assert n_params == sum(np.size(p) for p in jax.tree.leaves(params))
  # The tokenizer: AutoTokenizer reads it back and encodes as the run did.
  text = "def f(x):\n    return x ** 2  # squares\n"
  tok = hf[1].AutoTokenizer.from_pretrained(out)
  assert tok.encode(text) == run.data.tokenizer.encode(text)
  assert tok.decode(tok.encode(text)) == text
  assert tok.eos_token_id == run.data.tokenizer.eos_id == hf_model.config.eos_token_id


@pytest.mark.parametrize("ffn,model", [
    ("bimoa", {"groups": 2}),                                   # bi-sided MoA, two channel groups
    pytest.param("moa", {"gate": "softmax", "gate_bias": False}, marks=pytest.mark.slow),  # one-sided, softmax
    pytest.param("la_mlp", {}, marks=pytest.mark.slow),                                    # Type-I LA
    pytest.param("gelu_mlp", {"activations": ("gelu",), "primary": "gelu"}, marks=pytest.mark.slow),  # Type-I
])
def test_mixed_and_type1_ffns_load_as_custom_code_with_equal_logits(hf, tmp_path, data_cache, ffn, model, capsys):
  run, params = make_checkpoint(tmp_path / "run", data_cache, ffn, **model)
  out = str(tmp_path / "hf")
  assert export_hf.export(str(tmp_path / "run"), out)["architecture"] == "MoaLlamaForCausalLM"
  hf_model, ours, theirs = moa_and_hf_logits(hf, run, params, out, trust_remote_code=True)
  assert type(hf_model).__name__ == "MoaLlamaForCausalLM"
  assert np.max(np.abs(ours - theirs)) < TOL, np.max(np.abs(ours - theirs))
  # The mixing parameters are loaded, not left at their initial values.
  assert sum(p.numel() for p in hf_model.parameters()) == sum(np.size(p) for p in jax.tree.leaves(params))
  # The tokenizer needs no remote code (no y/N prompt without trust_remote_code), and the folder follows umask.
  capsys.readouterr()
  tok = hf[1].AutoTokenizer.from_pretrained(out)
  assert "custom code" not in capsys.readouterr().out
  assert tok.encode("def f(x):\n") == run.data.tokenizer.encode("def f(x):\n")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.slow
def test_bfloat16_export_loads_in_bfloat16(hf, tmp_path, data_cache):
  torch, transformers = hf
  run, params = make_checkpoint(tmp_path / "run", data_cache)
  out = str(tmp_path / "hf")
  export_hf.export(str(tmp_path / "run"), out, dtype="bfloat16")
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.config.dtype == torch.bfloat16
  ours = np.asarray(params["embedding"], np.float32)
  theirs = model.model.embed_tokens.weight.detach().float().numpy()
  assert np.max(np.abs(ours - theirs)) <= 2**-8 * np.max(np.abs(ours))


def test_refusals_are_one_line_and_write_nothing(tmp_path, data_cache):
  make_checkpoint(tmp_path / "moe", data_cache, "moa", size="debug_moe")
  r = cli(f"--workdir={tmp_path / 'moe'}", f"--out={tmp_path / 'hf_moe'}")
  assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.startswith("error: model.moe.num_experts = 8: MoE models cannot be exported"), r.stderr
  for args, needle in [
      ([f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'hf_none'}"], "checkpoints does not exist"),
      ([f"--workdir={tmp_path / 'moe'}", f"--out={tmp_path / 'hf_step'}", "--step=7"], "saved steps: [3]"),
      ([f"--workdir={tmp_path / 'moe'}", f"--out={tmp_path}"], "is not empty"),
      ([f"--workdir={tmp_path / 'moe'}", f"--out={tmp_path / 'hf_dtype'}", "--dtype=int8"], "--dtype=int8"),
  ]:
    with pytest.raises(SystemExit) as e:
      export_hf.main(args)
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), e.value.code
    assert needle in str(e.value.code), e.value.code
  assert sorted(os.listdir(tmp_path)) == ["moe"]
