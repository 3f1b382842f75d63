"""Matmul FLOPs of an optimized HLO module, with while loops counted once and counted per trip.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, so a step whose layers
are scanned (and whose microbatches are accumulated in a loop) is undercounted by about the trip counts.
`dot_flops` walks the HLO text: each computation's dot / convolution FLOPs, plus those of the computations
it calls (fusions, calls, conditionals), with a while body multiplied by its known trip count. The
difference between the two totals is the work cost_analysis missed. Pallas TPU calls count the FLOPs of
their `pl.CostEstimate` (a call without one counts none: `uncosted_calls` says how many there are).
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*[a-z]+\d*\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+)$")
_RESULT = re.compile(r"^[a-z]+\d*\[([\d,]*)\]\S*\s+([a-z\-]+)\((.*)")
_OPERAND = re.compile(r"%?([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ESTIMATE = re.compile(r'"cost_estimate":\s*\{[^}]*"flops":\s*(\d+)')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _instr_flops(rhs: str, shapes: dict[str, list[int]]) -> float:
  """FLOPs of one dot or convolution instruction (2 per multiply-add), or of a Pallas TPU call from its
  pl.CostEstimate; 0 for anything else. shapes: the computation's value names -> dims, for the operands."""
  if "custom-call(" in rhs:
    estimate = _ESTIMATE.search(rhs)
    return float(estimate.group(1)) if estimate else 0.0
  m = _RESULT.match(rhs)
  if not m or m.group(2) not in ("dot", "convolution"):
    return 0.0
  out = _dims(m.group(1))
  operands = [shapes.get(o) for o in _OPERAND.findall(m.group(3).split(")")[0])[:2]]
  if len(operands) < 2 or None in operands:
    return 0.0
  lhs, kernel = operands
  if m.group(2) == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rhs)
    k = math.prod(lhs[i] for i in _dims(contracting.group(1))) if contracting else 1
    return 2.0 * math.prod(out) * k
  return _conv_flops(rhs, out, lhs, kernel)


def _window(rhs: str, field: str, n: int, default: int) -> list[list[int]]:
  m = re.search(rf"\b{field}=([\d_x]+)", rhs)
  if not m:
    return [[default, default] if field == "pad" else [default] for _ in range(n)]
  return [[int(v) for v in part.split("_")] for part in m.group(1).split("x")]


def _conv_flops(rhs: str, out: list[int], lhs: list[int], kernel: list[int]) -> float:
  """As XLA's cost analysis counts a convolution: 2 × output batch·features × input features per
  group × the (output, window) position pairs that land on real input elements, per spatial dim.
  libtpu writes batched matmuls as convolutions whose dilated windows act as batch dimensions."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rhs)
  if not labels:
    return 0.0
  lhs_l, ker_l, out_l = labels.groups()
  spatial = sorted(c for c in lhs_l if c.isdigit())
  n = len(spatial)
  size, stride = _window(rhs, "size", n, 1), _window(rhs, "stride", n, 1)
  pad, lhs_dil, rhs_dil = _window(rhs, "pad", n, 0), _window(rhs, "lhs_dilate", n, 1), _window(rhs, "rhs_dilate", n, 1)
  pairs = 1
  for i, d in enumerate(spatial):
    extent = (lhs[lhs_l.index(d)] - 1) * lhs_dil[i][0] + 1
    valid = 0
    for o in range(out[out_l.index(d)]):
      for k in range(size[i][0]):
        pos = o * stride[i][0] - pad[i][0] + k * rhs_dil[i][0]
        valid += 0 <= pos < extent and pos % lhs_dil[i][0] == 0
    pairs *= valid
  batch_features = math.prod(out[j] for j, c in enumerate(out_l) if not c.isdigit())
  return 2.0 * batch_features * kernel[ker_l.index("i")] * pairs


def _computations(hlo: str) -> tuple[dict[str, list[str]], dict[str, dict], str]:
  """{computation: instruction lines}, {computation: {value name: dims}} and the entry's name."""
  comps, shapes, entry, current = {}, {}, "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      comps[current] = []
      shapes[current] = {n: _dims(d) for n, d in _PARAM.findall(header.group(2))}
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      m = _INSTR.match(line)
      if m:
        comps[current].append(m.group(2))
        result = _RESULT.match(m.group(2))
        if result:
          shapes[current][m.group(1)] = _dims(result.group(1))
  return comps, shapes, entry


def _condition_bound(comps: dict[str, list[str]], rhs: str):
  """The loop's trip count from its condition `i < constant(N)` (libtpu keeps no known_trip_count);
  a match whose group(1) is N, or None."""
  cond = re.search(r"\bcondition=%?([\w.\-]+)", rhs)
  lines = comps.get(cond.group(1), ()) if cond else ()
  if len(lines) > 6 or not any("direction=LT" in line for line in lines):
    return None
  bounds = [m for m in (re.search(r"^[su](?:32|64)\[\]\S*\s+constant\((\d+)\)", line) for line in lines) if m]
  return bounds[0] if len(bounds) == 1 else None


def uncosted_calls(hlo: str) -> int:
  """Pallas TPU calls (tpu_custom_call) that carry no cost estimate, so no cost model counts their work."""
  return sum(1 for line in hlo.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line and not _ESTIMATE.search(line))


def dot_flops(hlo: str) -> tuple[float, float, int]:
  """(once, per_trip, unknown_loops): matmul FLOPs of the entry computation with every while body
  counted once, and with each counted its known trip count times; how many loops had no known count."""
  comps, shapes, entry = _computations(hlo)
  memo: dict[str, tuple[float, float]] = {}
  unknown = set()

  def walk(name: str) -> tuple[float, float]:
    if name in memo:
      return memo[name]
    memo[name] = (0.0, 0.0)  # guards against cycles in malformed text
    once = trips = 0.0
    for rhs in comps.get(name, ()):
      f = _instr_flops(rhs, shapes[name])
      once, trips = once + f, trips + f
      called = _CALLED.findall(rhs)
      branches = _BRANCHES.search(rhs)
      if branches:
        called += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
      n, body = 1, re.search(r"\bbody=%?([\w.\-]+)", rhs)
      if re.search(r"\S\s+while\(", rhs):
        count = _TRIPS.search(rhs) or _condition_bound(comps, rhs)
        n = int(count.group(1)) if count else 1
        if not count:
          unknown.add(rhs)
      for c in called:
        o, t = walk(c)
        once, trips = once + o, trips + t * (n if body and c == body.group(1) else 1)
    memo[name] = (once, trips)
    return memo[name]

  once, trips = walk(entry)
  return once, trips, len(unknown)
