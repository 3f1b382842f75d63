"""Compile targets: a TPU slice (`v5p:2x2x2`) or N GPUs of a kind (`h100:8`), as compile-only devices.

    parse("v5p:2x2x2") -> Target(name, platform="tpu", chips=8, chip=CHIPS["v5p"], topology="v5p:2x2x2")
    devices(target)    -> the slice's compile-only devices (jax.experimental.topologies; no hardware)

TPU topologies are libtpu's names (generation:AxBxC); GPUs are described to XLA by a GpuTargetConfigProto
in text form (gpu_specs/*.txtpb, transcribed from openxla/xla with their commits named in each file).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

from moa_jax import platforms

SPECS = Path(__file__).parent / "gpu_specs"
INSTALL = 'pip install "moa_jax[aot]" (libtpu for TPU targets; jax-cuda12-plugin, -pjrt, nvcc, cuDNN for GPU targets)'


class TargetError(ValueError):
  """A target that is unknown, malformed or does not match the mesh; the message lists what works."""


@dataclasses.dataclass(frozen=True)
class Chip:
  platform: str         # tpu | gpu
  hbm_bytes: int        # memory per chip the compiled step must fit in
  peak_flops: float     # dense bf16 FLOP/s per chip (for MFU at the roofline time)
  source: str           # where the two numbers come from
  spec_file: str = ""   # GPU: the GpuTargetConfigProto text in gpu_specs/


GIB = 2**30
# TPU HBM: the capacity libtpu itself reports in its CompileTimeHbmOom message for a compile-only device
# of that generation (experiments/hardware_table.py --probe_hbm reprints them); peak bf16 FLOP/s from the
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v5e, v5p, v6e).
# GPU HBM: device_memory_size in XLA's target config; peak dense bf16 from NVIDIA's H100/H200/B200 data sheets.
CHIPS = {
    "v5e": Chip("tpu", int(15.75 * GIB), 197e12, "libtpu HBM; Cloud TPU v5e docs"),
    "v5p": Chip("tpu", int(95.73 * GIB), 459e12, "libtpu HBM; Cloud TPU v5p docs"),
    "v6e": Chip("tpu", int(31.24 * GIB), 918e12, "libtpu HBM; Cloud TPU v6e (Trillium) docs"),
    "h100": Chip("gpu", 84942979072, 989e12, "XLA h100_sxm.txtpb; NVIDIA H100 SXM data sheet", "h100_sxm.txtpb"),
    "h200": Chip("gpu", 151397597184, 989e12, "XLA h200.txtpb; NVIDIA H200 data sheet", "h200.txtpb"),
    "b200": Chip("gpu", 191514411008, 2250e12, "XLA b200.txtpb; NVIDIA B200 (DGX B200) data sheet", "b200.txtpb"),
}
EXAMPLES = "v5e:1x1, v5e:2x2, v5e:2x4, v5p:2x2x1, v5p:2x2x2, v6e:2x2, v6e:2x4, h100:1, h100:8, h200:8, b200:8"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str        # as given: v5p:2x2x2, h100:8
  kind: str        # key of CHIPS
  chips: int
  topology: str    # TPU: libtpu topology name; GPU: XLA topology "slices x hosts x devices per host"

  @property
  def chip(self) -> Chip:
    return CHIPS[self.kind]

  @property
  def platform(self) -> str:
    return self.chip.platform


def parse(name: str) -> Target:
  """'v5p:2x2x2' or 'h100:8' -> Target; TargetError (one line, what works) for anything else."""
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", (name or "").strip().lower())
  if not m or m.group(1) not in CHIPS:
    raise TargetError(f"--target={name!r} is not a known target; use a TPU topology GEN:AxB[xC] (GEN: "
                      f"{', '.join(k for k, c in CHIPS.items() if c.platform == 'tpu')}) or GPUs KIND:N (KIND: "
                      f"{', '.join(k for k, c in CHIPS.items() if c.platform == 'gpu')}), e.g. {EXAMPLES}")
  kind, dims = m.group(1), [int(x) for x in m.group(2).split("x")]
  if CHIPS[kind].platform == "tpu":
    if len(dims) not in (2, 3) or min(dims) < 1:
      raise TargetError(f"--target={name!r}: a TPU topology has 2 (v5e, v6e) or 3 (v5p) dimensions, "
                        f"e.g. {kind}:{'2x2x1' if kind == 'v5p' else '2x2'}")
    return Target(name, kind, math.prod(dims), f"{kind}:{'x'.join(map(str, dims))}")
  n = dims[0]
  if len(dims) != 1 or n < 1 or (n > 8 and n % 8):
    raise TargetError(f"--target={name!r}: give the number of GPUs, 1 to 8 or a multiple of 8 (8 per host), "
                      f"e.g. {kind}:8")
  return Target(name, kind, n, f"1x{max(n // 8, 1)}x{min(n, 8)}")


def _find(module: str):
  try:
    return importlib.util.find_spec(module)
  except ModuleNotFoundError:  # the parent package is absent
    return None


def missing_extra(target: Target) -> str | None:
  """The one-line install hint when the compiler for `target` is not installed, else None."""
  needed = (("libtpu",) if target.platform == "tpu" else
            ("jax_cuda12_plugin", "jax_plugins.xla_cuda12", "nvidia.cuda_nvcc", "nvidia.cudnn"))
  absent = [m for m in needed if _find(m) is None]
  if not absent:
    return None
  return f"--target={target.name} needs {', '.join(absent)}, not installed: {INSTALL}"


def gpu_target_config(target: Target) -> str:
  """The GpuTargetConfigProto text of the target's GPU, without comment lines."""
  text = (SPECS / target.chip.spec_file).read_text()
  return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def devices(target: Target) -> list:
  """The target's compile-only devices (no hardware needed); TargetError if libtpu rejects the shape."""
  import jax
  from jax.experimental import topologies

  try:
    if target.platform == "tpu":
      topo = topologies.get_topology_desc(target.topology, platform="tpu")
    else:
      topo = topologies.get_topology_desc("", platform="cuda", target_config=gpu_target_config(target),
                                          topology=target.topology)
  except jax.errors.JaxRuntimeError as e:
    raise TargetError(f"--target={target.name}: {str(e).splitlines()[0]}; e.g. {EXAMPLES}") from None
  return list(topo.devices)


def check_mesh(target: Target, mesh_config, shape_fn) -> tuple[int, ...]:
  """The mesh shape on the target's chips; TargetError naming meshes that fit when it does not match.
  shape_fn: sharding.mesh_shape (mesh config, device count) -> sizes, raising ValueError on a mismatch."""
  try:
    return shape_fn(mesh_config, target.chips)
  except ValueError as e:
    given = ", ".join(f"mesh.{a}={mesh_config[a]}" for a in ("data", "fsdp", "tensor", "expert"))
    raise TargetError(f"--target={target.name} has {target.chips} chips but {given} does not fit them ({e}); "
                      f"use e.g. --config.mesh.data=1 --config.mesh.fsdp={target.chips}, or set one axis "
                      f"to -1") from None


def use_host_cpu() -> None:
  """Keep the host backend on CPU so jax does not probe for local TPUs/GPUs (a deviceless compile needs
  none, and probing libtpu on a machine without a TPU is slow and noisy). A no-op once backends exist.
  Compile-only libtpu touches no chip, so several such processes may share the machine."""
  import jax

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

  try:
    jax.config.update("jax_platforms", "cpu")
  except RuntimeError:
    pass


def trace_platform(target: Target):
  """Context: kernels and attention choose their implementation for the target's platform."""
  return platforms.target(target.platform)
