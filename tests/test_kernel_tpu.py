"""The TPU layout as Mosaic sees it, checked on CPU with `jax.export(..., platforms=("tpu",))`:
no pad or slice of a T×F operand around the pallas_calls at G = 8, F = 5632 (F/G = 704, no
multiple of 128), and a block too big for VMEM fails in one line before lowering."""

import re

import jax
import jax.numpy as jnp
import pytest

from moa_jax import activations
from moa_jax.kernels import entry, tpu

PAPER = activations.PAPER_DICTIONARY


def _tpu_module(t, f, groups, glu=True, bi=True, **kw):
  names, names_u = PAPER, (PAPER if bi else None)
  h = jax.ShapeDtypeStruct((t, f), jnp.bfloat16)
  coef = jax.ShapeDtypeStruct((t, groups, len(PAPER)), jnp.float32)

  def loss(h, c, u, cu):
    y = entry.mix_product(h, c, names, u if glu else None, cu if bi else None, names_u,
                          backend="tpu", interpret=False, **kw)
    return jnp.sum(y.astype(jnp.float32))

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  return jax.export.export(fn, platforms=("tpu",))(h, coef, h, coef).mlir_module()


def _txf_reshapes(text, t, f):
  """pad / slice ops whose operand or result is a T×F-sized array (any 2-D or 3-D view)."""
  ops = [line for line in text.splitlines() if re.search(r"stablehlo\.(pad|slice)\b", line)]
  size = lambda dims: eval("*".join(dims.split("x")[:-1]) or "0")
  return [op for op in ops
          if any(size(d) >= t * f for d in re.findall(r"tensor<([0-9x]+x\w+)>", op))]


@pytest.mark.parametrize("groups", [1, 8])
def test_no_txf_padding_at_f5632(groups):
  """The anchor width F = 5632 in 1 or 8 groups: both pallas_calls, and no T×F pad/slice."""
  t, f = 256, 5632
  text = _tpu_module(t, f, groups)
  assert text.count("stablehlo.custom_call @tpu_custom_call") == 2
  assert _txf_reshapes(text, t, f) == []
  tl = tpu.LAYOUT.tiling(t, f // groups, groups, True, None, None)
  assert tl.f_pad == f // groups and tl.t_pad == t


def test_padding_check_can_fail():
  """The same check sees the T padding that T = 200 (no multiple of the 128-row block) needs."""
  text = _tpu_module(200, 5632, 8, block_t=128)
  assert _txf_reshapes(text, 200, 5632)


def test_block_too_big_for_vmem_is_one_line_error():
  with pytest.raises(ValueError, match=r"needs ~\d+ MiB of VMEM, above 64 MiB; pass a smaller block_t"):
    _tpu_module(4096, 5632, 8, block_t=4096)


def _custom_calls(text):
  """(cost estimate, [tensor types]) of every tpu_custom_call in an exported module."""
  out = []
  for line in text.splitlines():
    if "stablehlo.custom_call @tpu_custom_call" not in line:
      continue
    est = dict(re.findall(r"\\22(\w+)\\22:(\d+)", line.split("cost_estimate", 1)[1].split("}", 1)[0]))
    types = re.findall(r"tensor<([0-9x]+)x(bf16|f32)>", line.rsplit("} :", 1)[1])
    out.append(({k: int(v) for k, v in est.items()}, types))
  return out


@pytest.mark.parametrize("glu,bi", [(False, False), (True, False), (True, True)])
def test_cost_estimates_match_the_work(glu, bi):
  """Each pallas_call's CostEstimate: bytes = its operands and results as the HLO types them;
  FLOPs and transcendentals counted from the shapes and the activation table (the paper's
  seven functions cost three tanh per element and side: tanh z, tanh z/2, tanh g)."""
  t, f = 256, 5632
  calls = _custom_calls(_tpu_module(t, f, 8, glu=glu, bi=bi))
  assert len(calls) == 2
  sides = 2 if bi else 1
  table = sum(activations.ACTIVATIONS[n].flops + 2 for n in PAPER)
  want_flops = {"fwd": sides * table + (1 if glu else 0),
                "bwd": sides * (2 * table + 2 * len(PAPER)) + (3 if glu else 0)}
  for (est, types), direction in zip(calls, ("fwd", "bwd")):
    nbytes = sum(eval(dims.replace("x", "*")) * (2 if dt == "bf16" else 4) for dims, dt in types)
    assert est["bytes_accessed"] == nbytes, (direction, est, types)
    assert est["flops"] == t * f * want_flops[direction], (direction, est)
    assert est["transcendentals"] == t * f * 3 * sides, (direction, est)
