"""The command lines on one short debug run: plot, sample and eval (`python -m moa_jax.<tool>`)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from moa_jax import eval as evaluate
from moa_jax import generate, plot, rundir, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's processes: the eval CLI reuses the
  training run's compiled eval step."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def cli(module: str, *args: str, cache: str, check: bool = True) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  if check:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory, data_cache, jax_cache):
  """configs/debug.py for 12 steps (bi-MoA), checkpoints at 6 and 12."""
  workdir = str(tmp_path_factory.mktemp("cli") / "debug_run")
  cli("moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}", "--config.train.steps=12",
      "--config.train.log_every=2", "--config.train.eval_every=6", "--config.train.eval_batches=2",
      "--config.train.sample_every=0", "--config.checkpoint.every=6", f"--config.data.cache_dir={data_cache}",
      "--config.data.max_bytes=400000", cache=jax_cache)
  return workdir


def test_plot_cli_writes_a_png_per_metric(debug_run, tmp_path, jax_cache):
  out = tmp_path / "curves.png"
  result = cli("moa_jax.plot", debug_run, debug_run + "/", "--out", str(out), cache=jax_cache)
  assert f"wrote {out}" in result.stdout
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
  plot.main([debug_run, "--out", str(tmp_path / "eval.png"), "--metric", "eval_loss", "--x", "step"])
  assert (tmp_path / "eval.png").stat().st_size > 10_000
  with pytest.raises(SystemExit, match="no 'nope' values"):
    plot.main([debug_run, "--out", str(tmp_path / "x.png"), "--metric", "nope"])
  with pytest.raises(SystemExit, match="error: .*metrics.jsonl does not exist"):
    plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_ema_is_debiased():
  assert plot.ema([2.0, 2.0, 2.0], 0.9).tolist() == pytest.approx([2.0, 2.0, 2.0])
  assert plot.ema([1.0, 3.0], 0.5).tolist() == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_sample_cli_greedy_is_deterministic_and_continues_the_prompt(debug_run, jax_cache):
  args = ["--workdir=" + debug_run, "--prompt=def ", "--max_new_tokens=12", "--temperature=0"]
  printed = cli("moa_jax.sample", *args, cache=jax_cache).stdout
  assert printed.startswith("def ")
  # Greedy ignores the per-sample seeds: the same text every time, and the same as the CLI's.
  texts = sample.sample_text(debug_run, "def ", max_new_tokens=12, temperature=0.0, num_samples=2)
  assert texts[0] == texts[1] and printed == "def " + texts[0] + "\n"
  with pytest.raises(SystemExit, match="no checkpoint at step 5 .* saved steps: \\[6, 12\\]"):
    sample.main(["--workdir=" + debug_run, "--prompt=x", "--step=5"])


def test_eval_cli_reproduces_the_training_eval_loss(debug_run, jax_cache):
  result = json.loads(cli("moa_jax.eval", "--workdir=" + debug_run, "--json", cache=jax_cache).stdout)
  final = rundir.records(debug_run)[-1]
  assert result["step"] == 12 and result["batches"] == 2 and result["tokens"] == 2 * 8 * 64
  assert result["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
  assert result["perplexity"] == pytest.approx(2.718281828 ** final["eval_loss"], rel=1e-5)
  more = evaluate.evaluate_checkpoint(debug_run, step=6, batches=3)
  at_6 = next(r for r in rundir.records(debug_run) if r["step"] == 6)
  assert more["step"] == 6 and more["batches"] == 3 and abs(more["eval_loss"] - at_6["eval_loss"]) < 0.1
  with pytest.raises(SystemExit, match="checkpoints does not exist; is .* a run directory"):
    evaluate.main(["--workdir=" + os.path.dirname(debug_run) + "/missing"])


def _fixed_logits(variables, buffer):  # a stand-in model: the same next-token logits everywhere
  return jnp.broadcast_to(variables["params"]["logits"], buffer.shape + variables["params"]["logits"].shape)


def test_generate_greedy_top_k_and_eos():
  params = {"logits": jnp.array([0.0, 3.0, 2.9, -1.0, 1.0])}  # token 1 most likely, then 2
  assert generate.generate(_fixed_logits, params, [0], 4, temperature=0.0) == [1, 1, 1, 1]
  assert generate.generate(_fixed_logits, params, [0], 4, temperature=5.0, top_k=1, seed=7) == [1, 1, 1, 1]
  drawn = generate.generate(_fixed_logits, params, [0], 200, temperature=5.0, top_k=2, seed=0)
  assert set(drawn) == {1, 2}  # hot enough to draw both, and never outside the top 2
  assert set(generate.generate(_fixed_logits, params, [0], 200, temperature=5.0, top_k=0, seed=0)) == {0, 1, 2, 3, 4}
  assert generate.generate(_fixed_logits, params, [0], 9, temperature=0.0, eos_id=1) == [1]
  with pytest.raises(ValueError, match="prompt is empty"):
    generate.generate(_fixed_logits, params, [], 3)
