"""Costs that grow with experts: FSDP all-gathers move weights in the compute dtype (train.py casts the
matrices before the model runs), measured on the HLO after SPMD partitioning of the debug MoE model's
train step on 8 fake CPU devices (fsdp=2, expert=4; XLA:CPU itself later promotes every bf16
collective to f32, so its final HLO cannot show this). One subprocess: the device count and XLA's dump
flags are fixed at jax import."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest


def _gathered(dump: str) -> dict:
  """Bytes all-gathered per dtype for the expert weights (rank-4 results: (1 layer, E/P, D, F))."""
  from moa_jax import profiling
  text = open(glob.glob(os.path.join(dump, "*train_step*after_spmd-partitioning*"))[-1]).read()
  lines = "\n".join(l for l in text.splitlines() if re.search(r"= \w+\[\d+,\d+,\d+,\d+\]\S* all-gather\(", l))
  return {dt: profiling.collective_bytes(lines, (dt,))["all-gather"] for dt in ("f32", "bf16")}


def _worker(out: str) -> None:
  from moa_jax import presets, train
  results = {}
  for name, cast in (("before", lambda params, spec: params), ("after", train.cast_matrices)):
    train.cast_matrices = cast
    c = presets.lm_config("debug_moe", "bimoa")
    c.model.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 4
    train.compile_train_step(train.build(c, with_data=False))
    dump = os.path.join(out, "dump")
    results[name] = _gathered(dump)
    shutil.rmtree(dump)                 # XLA writes the next compile's dump afresh
  with open(os.path.join(out, "bytes.json"), "w") as f:
    json.dump(results, f)


@pytest.mark.slow
def test_fsdp_gathers_move_expert_weights_in_bf16_half_the_bytes(tmp_path):
  dump = tmp_path / "dump"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 "
         f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning"}
  root = os.path.join(os.path.dirname(__file__), "..")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  got = json.load(open(tmp_path / "bytes.json"))
  print("expert-weight all-gather bytes:", got)
  assert got["before"]["f32"] > 0 and got["before"]["bf16"] == 0, got   # fp32 gathers at the shard_map boundary
  assert got["after"]["f32"] == 0 and got["after"]["bf16"] * 2 == got["before"]["f32"], got


if __name__ == "__main__":
  _worker(sys.argv[1])
