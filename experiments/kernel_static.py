"""Static cost of the fused mixing kernel on an H200, measured on a CPU (no GPU needed).

    pip install -e ".[static]"                        # the triton wheel: its ptxas, its LLVM
    python experiments/kernel_static.py               # table; --json also writes JSON
    python experiments/kernel_static.py --json --out experiments/results/kernel_static.json

For every variant (Type-I, one-sided, bi-sided; K = 1 and 7; G = 1 and 8; bf16; T = 16384,
F = 5632 as in the H200 anchors, docs/kernel.md) and for the forward and backward kernels separately:

  1. lower the jitted fwd+bwd for CUDA with `jax.export` (jax 0.12: under an abstract H200 mesh,
     older jax falls back to sm_90 itself) and capture the Triton IR (TTIR) that Pallas hands to
     XLA, by wrapping `lower_jaxpr_to_triton_module`;
  2. compile that TTIR with the `triton` wheel's own pipeline (TTIR → TTGIR → LLVM → PTX) for
     sm_90a, with the num_warps the kernel asked for;
  3. run the wheel's ptxas with `-v` on the PTX: registers per thread, stack and spill bytes;
  4. count PTX instructions per element: static instruction count (loop bodies weighted by their
     trip count, read from the TTIR's `scf.for`) over the elements one thread handles.

XLA compiles the same TTIR with its own bundled Triton, so these are a strong proxy, not the
binary XLA would run. Columns: regs, spill (store bytes), stack, instr/elem, and the
transcendental mix (MUFU ops per element: ex2, rcp/div, tanh.approx).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moa_jax import activations  # noqa: E402
from moa_jax.kernels import entry, triton as mix_triton  # noqa: E402

T, F = 16384, 5632  # the H200 anchor shape (docs/kernel.md)
PAPER = activations.PAPER_DICTIONARY
TRITON_CALL = mix_triton.CUSTOM_CALL


@dataclasses.dataclass(frozen=True)
class Variant:
  kind: str  # typeI | one | bi
  k: int
  groups: int

  @property
  def label(self) -> str:
    return f"{self.kind}-K{self.k}-G{self.groups}"

  @property
  def names(self) -> tuple[str, ...]:
    return PAPER if self.k == 7 else ("silu",)


VARIANTS = [Variant(kind, k, g) for kind in ("typeI", "one", "bi") for k in (7, 1) for g in (1, 8)]


# ---------------------------------------------------------------------------------------------
# 1. Lowering: TTIR text, num_warps and grid of every Triton kernel in one fwd+bwd.


def lower_variant(v: Variant, **kernel_kwargs) -> list[dict]:
  """[{name, ttir, num_warps, grid}] for the forward and backward kernels of one variant."""
  from jax._src.pallas.triton import lowering as triton_lowering

  captured = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  h = jax.ShapeDtypeStruct((T, F), jnp.bfloat16)
  coef = jax.ShapeDtypeStruct((T, v.groups, v.k), jnp.float32)
  u = h if v.kind != "typeI" else None
  coef_u = coef if v.kind == "bi" else None
  names_u = v.names if v.kind == "bi" else None

  def loss(h, c, u, cu):
    y = entry.mix_product(h, c, v.names, u, cu, names_u, backend="gpu", interpret=False,
                        **kernel_kwargs)
    return jnp.sum(y.astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1) + ((2,) if u else ()) +
                                    ((3,) if coef_u else ())))
  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    text = mix_triton.export_for_gpu(step, h, coef, u, coef_u).mlir_module()
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  calls = re.findall(r"custom_call @" + re.escape(TRITON_CALL) + r"\(.*", text)
  configs = [dict(name=re.search(r'name = "([^"]+)"', c).group(1),
                  num_warps=int(re.search(r"num_warps = (\d+)", c).group(1)),
                  grid=tuple(int(re.search(rf"grid_{a} = (\d+)", c).group(1)) for a in "xyz"))
             for c in calls]
  if len(configs) != len(captured):
    raise RuntimeError(f"{v.label}: {len(captured)} Triton modules, {len(configs)} custom calls")
  return [dict(cfg, ttir=ttir) for cfg, ttir in zip(configs, captured)]


# ---------------------------------------------------------------------------------------------
# 2.-3. TTIR -> PTX (triton wheel) -> ptxas -v.


def triton_paths():
  import triton
  from triton.backends.nvidia import compiler as nv
  return triton, nv


def compile_ptx(ttir: str, num_warps: int) -> str:
  triton, _ = triton_paths()
  from triton.backends.compiler import GPUTarget
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses mul+add too
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=3))
  return kernel.asm["ptx"]


def ptxas_stats(ptx: str) -> dict:
  _, nv = triton_paths()
  ptxas = nv.get_ptxas(90).path
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                          "-o", src + ".o"], capture_output=True, text=True, check=True).stderr
  number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0
  return dict(regs=number(r"Used (\d+) registers"), stack=number(r"(\d+) bytes stack frame"),
              spill_stores=number(r"(\d+) bytes spill stores"),
              spill_loads=number(r"(\d+) bytes spill loads"))


# ---------------------------------------------------------------------------------------------
# 4. Instructions per element.

_INSTR = re.compile(r"^\s*(@!?%\w+\s+)?([a-z][\w.]*)")
_LABEL = re.compile(r"^\s*(\$?[\w$]+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w$]+);")


def loop_trips(ttir: str) -> list[int]:
  """Constant trip counts of the TTIR's scf.for loops, in order."""
  consts = {}
  ops = {"addi": lambda a, b: a + b, "subi": lambda a, b: a - b, "muli": lambda a, b: a * b}
  for line in ttir.splitlines():  # fold the scalar i32 arithmetic the bounds are made of
    if m := re.search(r"(%\w+) = arith.constant (-?\d+) : i32$", line):
      consts[m.group(1)] = int(m.group(2))
    elif (m := re.search(r"(%\w+) = arith.(addi|subi|muli) (%\w+), (%\w+) : i32$", line)) and \
        m.group(3) in consts and m.group(4) in consts:
      consts[m.group(1)] = ops[m.group(2)](consts[m.group(3)], consts[m.group(4)])
  trips = []
  for lb, ub, step in re.findall(r"scf.for %\w+ = (%\w+) to (%\w+) step (%\w+)", ttir):
    if all(x in consts for x in (lb, ub, step)):
      trips.append((int(consts[ub]) - int(consts[lb])) // int(consts[step]))
  return trips


def count_instructions(ptx: str, trips: list[int]) -> tuple[float, dict]:
  """(dynamic instruction count per thread, opcode -> count), loops weighted by trips.

  A backward branch to an earlier label closes a loop; loops are matched to TTIR loops in
  program order (nested loops multiply)."""
  body = ptx[ptx.index("{", ptx.index(".entry")):]
  lines = body.splitlines()
  labels, instrs = {}, []  # label -> index in instrs
  for line in lines:
    line = line.split("//")[0]
    if m := _LABEL.match(line):
      labels[m.group(1)] = len(instrs)
      continue
    m = _INSTR.match(line)
    if m and not line.strip().startswith("."):
      instrs.append((m.group(2), line))
  weight = [1] * len(instrs)
  loops = [(labels[b.group(1)], i) for i, (op, line) in enumerate(instrs)
           if op.startswith("bra") and (b := _BRANCH.search(line)) and
           labels.get(b.group(1), len(instrs)) <= i]
  for n, (start, end) in enumerate(sorted(loops)):
    trip = trips[n] if n < len(trips) else 1
    for i in range(start, end + 1):
      weight[i] *= trip
  mix_ = {}
  for (op, _), w in zip(instrs, weight):
    mix_[op] = mix_.get(op, 0) + w
  return float(sum(weight)), mix_


def transcendentals(mix_: dict, elems: float) -> str:
  groups = {"ex2": ("ex2",), "tanh": ("tanh",), "div": ("div", "rcp"), "lg2": ("lg2",)}
  parts = []
  for name, keys in groups.items():
    n = sum(c for op, c in mix_.items() if any(op.startswith(k) for k in keys))
    if n:
      parts.append(f"{name} {n / elems:.2g}")
  return " ".join(parts)


# ---------------------------------------------------------------------------------------------


def analyse(v: Variant, **kernel_kwargs) -> list[dict]:
  rows = []
  for kernel in lower_variant(v, **kernel_kwargs):
    t0 = time.perf_counter()
    ptx = compile_ptx(kernel["ttir"], kernel["num_warps"])
    stats = ptxas_stats(ptx)
    trips = loop_trips(kernel["ttir"])
    dynamic, mix_ = count_instructions(ptx, trips)
    programs = math.prod(kernel["grid"])
    elems = T * F / programs / (32 * kernel["num_warps"])  # (t, f) elements per thread
    rows.append(dict(variant=v.label, kernel="fwd" if "fwd" in kernel["name"] else "bwd",
                     num_warps=kernel["num_warps"], grid=kernel["grid"], loop_trips=trips,
                     elems_per_thread=elems, instr_per_elem=dynamic / elems,
                     transcendentals=transcendentals(mix_, elems), **stats,
                     compile_s=round(time.perf_counter() - t0, 1)))
  return rows


def _per_thread(r: dict) -> str:
  trips = math.prod(r["loop_trips"]) if r["loop_trips"] else 1
  return f"{r['elems_per_thread'] / trips:g}×{trips}" if trips > 1 else f"{r['elems_per_thread']:g}"


def table(rows: list[dict]) -> str:
  head = ("| variant | kernel | warps | elems/thread | regs | spill B | stack B | instr/elem "
          "| MUFU+div/elem |")
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['kernel']} | {r['num_warps']} | "
                 f"{_per_thread(r)} | {r['regs']} | {r['spill_stores']} | {r['stack']} "
                 f"| {r['instr_per_elem']:.1f} | {r['transcendentals']} |")
  return "\n".join(lines)


def compare(before: list[dict], after: list[dict]) -> str:
  """Before/after table keyed by (variant, kernel): regs, spill bytes, instructions per element."""
  old = {(r["variant"], r["kernel"]): r for r in before}
  lines = ["| variant | kernel | regs | spill B | instr/elem | MUFU+div/elem |", "|---|---|---|---|---|---|"]
  for r in after:
    o = old.get((r["variant"], r["kernel"]))
    pair = lambda key, spec="": (f"{format(o[key], spec)} → " if o else "") + format(r[key], spec)
    lines.append(f"| {r['variant']} | {r['kernel']} | {pair('regs')} | {pair('spill_stores')} | "
                 f"{pair('instr_per_elem', '.1f')} | {(o['transcendentals'] + ' → ') if o else ''}"
                 f"{r['transcendentals']} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="also write JSON to --out")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments/results/kernel_static.json"))
  parser.add_argument("--only", default="", help="comma-separated variant labels, e.g. bi-K7-G1")
  parser.add_argument("--compare", default="", help="a JSON written before: print before → after")
  args = parser.parse_args(argv)
  try:
    triton_paths()
  except ImportError:
    print('error: the triton wheel is not installed; run: pip install -e ".[static]"')
    return 2
  only = set(filter(None, args.only.split(",")))
  rows = []
  for v in VARIANTS:
    if only and v.label not in only:
      continue
    rows.extend(analyse(v))
    print(f"{v.label}: done", file=sys.stderr, flush=True)
  print(f"Pallas Triton kernels for sm_90a (triton {triton_paths()[0].__version__}, "
        f"jax {jax.__version__}), T={T}, F={F}, bf16\n")
  print(table(rows))
  if args.compare:
    with open(args.compare) as f:
      print("\nbefore → after\n\n" + compare(json.load(f)["rows"], rows))
  if args.json:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(jax=jax.__version__, triton=triton_paths()[0].__version__, T=T, F=F,
                     dtype="bfloat16", target="sm_90a", rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
