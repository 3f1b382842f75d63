"""Compile the real train step for a TPU slice or GPUs on a CPU host, and say whether it fits.

    python -m moa_jax.train --config=configs/moa_2b.py --compile_only --target=v5p:2x2x2 --config.mesh.fsdp=8

Builds the run (`step.build`, no data) over the target's compile-only devices, compiles the step with
libtpu or XLA:GPU (`step.compile_train_step`), and reports per chip: memory against the chip's HBM,
the collectives, and on TPU the cost model's roofline step time corrected for loop trip counts
(`hlo.dot_flops`), with tokens/s and MFU at that time. These are compiler estimates, not measurements.
"""

from __future__ import annotations

import contextlib
import math
import re
import time

import jax

from moa_jax import attention, profiling, sharding, step
from moa_jax.aot import hlo, targets
from moa_jax.aot.targets import TargetError

GIB = 2**30
_HBM_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)G")


def _abstract_mesh_context(run):
  """Pallas Triton asks the abstract mesh for the GPU it lowers for (no local GPU to ask)."""
  use = getattr(jax.sharding, "use_abstract_mesh", None)
  return use(run.mesh.abstract_mesh) if use else contextlib.nullcontext()


def _roofline(compiled, text: str, n_tokens: int, peak: float, splash_flops: float) -> dict:
  """The TPU cost model's step time, its FLOPs corrected for while-loop trips, tokens/s and MFU.
  text: the compiled HLO. splash_flops: per chip, the attention FLOPs (the model summary's count) of
  splash kernels, which carry no cost estimate; they are added at the chip's peak rate."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  flops, seconds = float(cost.get("flops", 0.0)), float(cost.get("optimal_seconds", 0.0))
  if flops <= 0 or seconds <= 0:
    return {}
  once, trips, unknown = hlo.dot_flops(text)
  corrected = flops + trips - once
  # the loop bodies are assumed to take the cost model's time per FLOP of the whole step
  step = seconds * corrected / flops + splash_flops / peak
  total = corrected + splash_flops
  return {"flops_reported": flops, "flops_per_chip": total, "optimal_seconds_reported": seconds,
          "splash_flops_per_chip": splash_flops, "step_seconds": step, "tokens_per_sec": n_tokens / step,
          "unknown_loops": unknown, "uncosted_calls": hlo.uncosted_calls(text),
          "mfu": total / step / peak}


def custom_calls(hlo_text: str) -> dict:
  """{custom-call target: count} in an optimized HLO: tpu_custom_call (Pallas TPU), Triton, cuDNN."""
  found = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
  return {name: found.count(name) for name in sorted(set(found))}


def suggestion(config, target, total: float, temp: float) -> str:
  """What would fit instead: more microbatches (temporaries shrink about in proportion), full remat,
  or twice the chips."""
  c = config.train
  micro = c.get("microbatches", 1)
  free = 0.9 * target.chip.hbm_bytes - (total - temp)
  ideas = []
  if free > 0:
    want = micro * math.ceil(temp / free)
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, target.chips)))
    per_shard = c.batch_size // math.prod(sizes[a] for a in sharding.BATCH_AXES)
    fits = [m for m in range(want, per_shard + 1) if per_shard % m == 0]
    if fits:
      ideas.append(f"--config.train.microbatches={fits[0]}")
  if config.model.remat != "full":
    ideas.append("--config.model.remat=full")
  bigger = {"tpu": f"{target.kind}:<topology with {2 * target.chips} chips>", "gpu": f"{target.kind}:{2 * target.chips}"}
  ideas.append(f"--target={bigger[target.platform]}")
  return " or ".join(ideas)


def compile_for_target(config, target_name: str) -> dict:
  """Compiles the train step for `target_name`; returns its memory, collectives and cost figures.
  Raises TargetError (one line) for an unknown target, a missing compiler, a mismatched mesh, or a
  step that does not fit the chip's HBM (with what would fit)."""
  target = targets.parse(target_name)
  hint = targets.missing_extra(target)
  if hint:
    raise TargetError(hint)
  shape = targets.check_mesh(target, config.mesh, sharding.mesh_shape)
  targets.use_host_cpu()
  devices = targets.devices(target)
  with targets.trace_platform(target):
    try:
      run = step.build(config, with_data=False, devices=devices)
    except ValueError as e:
      raise TargetError(str(e)) from None
    start = time.perf_counter()
    try:
      with _abstract_mesh_context(run):
        compiled = step.compile_train_step(run)
    except jax.errors.JaxRuntimeError as e:
      oom = _HBM_OOM.search(str(e))
      if not oom:
        raise
      scale = {"G": GIB, "M": 2**20, "K": 2**10}[oom.group(2)]
      temp = float(oom.group(1)) * scale
      raise TargetError(f"{config.get('name', 'run')} does not fit --target={target.name}: libtpu needs "
                        f"{temp / GIB:.2f} GiB of temporaries per chip, more than its {oom.group(3)} GiB of HBM; "
                        f"try {suggestion(config, target, temp, temp)}") from None
    seconds = time.perf_counter() - start
  mem, text = profiling.compiled_memory(compiled), compiled.as_text()
  out = {"target": target.name, "platform": target.platform, "chips": target.chips,
         "device_kind": devices[0].device_kind, "mesh": dict(zip(sharding.MESH_AXES, shape)),
         "compile_seconds": seconds, "memory": mem, "hbm_bytes": target.chip.hbm_bytes,
         "fits": mem["total"] <= target.chip.hbm_bytes,
         "collectives": profiling.collective_counts(text), "custom_calls": custom_calls(text),
         "tokens": config.train.batch_size * config.train.seq_len,
         "model_flops_per_chip": run.summary["flops_per_token"] * config.train.batch_size
         * config.train.seq_len / target.chips,
         "hlo": text}  # the optimized module, for a later look (collectives, loops)
  if target.platform == "tpu":
    splash = attention.resolve_impl(config.model.attention_impl, config.model.dtype, config.train.seq_len,
                                    "tpu") == "splash"
    attn = run.summary["attention_flops_per_token"] * out["tokens"] / target.chips if splash else 0.0
    out["roofline"] = _roofline(compiled, text, out["tokens"], target.chip.peak_flops, attn)
  out["suggestion"] = None if out["fits"] else suggestion(config, target, mem["total"], mem["temp"])
  return out


def format_report(config, r: dict) -> str:
  """The lines --compile_only --target prints."""
  mem, gib = r["memory"], lambda b: f"{b / GIB:.2f} GiB"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  verdict = "fits" if r["fits"] else "DOES NOT FIT"
  lines = [f"{config.get('name', 'run')}: train step compiled for --target={r['target']} ({r['chips']} × "
           f"{r['device_kind']}, mesh {mesh}, batch {config.train.batch_size} × {config.train.seq_len}, "
           f"microbatches {config.train.get('microbatches', 1)}) in {r['compile_seconds']:.0f} s; "
           f"compiler estimates, not measurements",
           f"  memory per chip      {gib(mem['total'])} of {gib(r['hbm_bytes'])} HBM: {verdict} (arguments "
           f"{gib(mem['argument'])}, temporaries {gib(mem['temp'])}, outputs not aliased "
           f"{gib(mem['output'] - mem['alias'])}, code {gib(mem['generated_code'])})"]
  if r["platform"] == "gpu" and r["fits"] and mem["total"] > 0.75 * r["hbm_bytes"]:
    lines.append("  note: above jax's default GPU memory pool (75% of HBM); run with "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION=.95")
  lines.append("  collectives per step " + (", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v)
                                            or "none"))
  roof = r.get("roofline") or {}
  if roof:
    splash = (f", splash attention's {roof['splash_flops_per_chip']:.3g} at peak" if roof["splash_flops_per_chip"]
              else "")
    if roof["unknown_loops"]:
      splash += f"; {roof['unknown_loops']} loops of unknown trip count counted once: a lower bound"
    lines.append(f"  roofline step time   {roof['step_seconds']:.3f} s (TPU cost model, loop trips counted: "
                 f"{roof['flops_per_chip']:.3g} FLOP/chip, {roof['flops_reported']:.3g} as reported{splash}); "
                 f"{roof['tokens_per_sec']:,.0f} tokens/s, MFU {100 * roof['mfu']:.0f}% at that time")
  elif r["platform"] == "gpu":
    lines.append("  roofline step time   not given: XLA:GPU's compiled cost analysis is empty")
  return "\n".join(lines)


def report(config, target_name: str) -> str:
  """--compile_only --target: the report's lines; TargetError (one line, what would fit) when the step
  does not fit the chip, after printing the report."""
  r = compile_for_target(config, target_name)
  r.pop("hlo")
  text = format_report(config, r)
  if r["fits"]:
    return text
  print(text)
  gib = lambda b: f"{b / GIB:.2f} GiB"
  raise TargetError(f"{config.get('name', 'run')} does not fit --target={r['target']}: {gib(r['memory']['total'])} "
                    f"per chip > {gib(r['hbm_bytes'])} of HBM; try {r['suggestion']}")
