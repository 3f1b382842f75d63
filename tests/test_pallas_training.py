"""`model.ffn.impl = "pallas"` inside the real model and train step gives xla's losses."""

import jax
import numpy as np
import pytest

from moa_jax import train


def _losses(config, steps=3):
  run = train.build(config)
  step_fn = jax.jit(train.make_train_step(run.model, run.tx, run.lr_schedule, {}))
  state, it, out = train.init_state(run), run.data.train_iter(), []
  for _ in range(steps):
    state, metrics = step_fn(state, train.global_batch(run, next(it)))
    out.append(float(metrics["loss"]))
  return out, jax.device_get(metrics["grad_norm"])


@pytest.mark.parametrize("ffn", [pytest.param("bimoa", marks=pytest.mark.slow),  # ~80 s on 2 busy cores: Pallas interpret
                                 pytest.param("la_mlp", marks=pytest.mark.slow),
                                 pytest.param("moa", marks=pytest.mark.slow)])
def test_pallas_train_steps_match_xla(debug_config, ffn):
  from moa_jax import presets
  debug_config.model.ffn = presets.ffn_config(ffn, debug_config.model.d_model, 32)
  debug_config.model.ffn.groups = 2
  xla, g_xla = _losses(debug_config)
  debug_config.model.ffn.impl = "pallas"
  pallas, g_pallas = _losses(debug_config)
  # fp32 compute: the kernel and the reference differ only in summation order.
  np.testing.assert_allclose(pallas, xla, rtol=1e-5)
  np.testing.assert_allclose(g_pallas, g_xla, rtol=1e-4)


@pytest.mark.slow  # ~4 min on 2 shared cores
def test_fast_precision_train_steps_match_xla(debug_config, monkeypatch):
  """The GPU default, precision="fast" (tanh to 2^-11; emulated in the interpreter), trains
  like xla: the same losses to well within bf16 rounding."""
  from moa_jax import presets
  from moa_jax.kernels import entry
  debug_config.model.ffn = presets.ffn_config("bimoa", debug_config.model.d_model, 32)
  xla, _ = _losses(debug_config)
  resolve = entry._resolve
  monkeypatch.setattr(entry, "_resolve", lambda backend, interpret, _: resolve(backend, interpret, "fast"))
  debug_config.model.ffn.impl = "pallas"
  fast, _ = _losses(debug_config)
  np.testing.assert_allclose(fast, xla, rtol=1e-3)
  assert fast != xla  # the emulated fast tanh really ran
