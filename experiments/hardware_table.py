"""The hardware table: each preset × each target, compiled on this CPU machine with the real compilers
(libtpu, XLA:GPU) through moa_jax.aot. Compiler estimates, not measurements.

    python experiments/hardware_table.py                      # print the table from results/hardware_table.json
    python experiments/hardware_table.py --compile=KEY,KEY    # compile those cells (one process each), store, print
    python experiments/hardware_table.py --compile=all        # every cell not stored yet (many hours on 2 cores)
    python experiments/hardware_table.py --list               # every cell's key and its train.py command

A key is ROW/COLUMN: 2b_bimoa/xla/v5p:2x2x2 (size_ffn/impl[+attention]/target), e.g.
0.12b_bimoa/xla+attn_xla/v5p:2x2x2 for XLA's attention instead of the default (auto: splash on TPU,
cuDNN on GPU). Each cell runs with FSDP over all chips (MoE rows: experts over all chips), the preset's
batch (256 × 2048) and the microbatches in MICRO; the table says which it used. Needs `pip install .[aot]`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hardware_table.json")
TARGETS = ("v5e:2x4", "v5p:2x2x2", "v6e:2x4", "h100:8", "h200:8")
SIZES = ("0.12b", "0.35b", "0.77b", "1.3b", "2b")
MOE = ("moe_2b_a0.6b",)
# Microbatches per step by (size, chip): chosen so each chip holds what fits; a compiled cell confirms it.
MICRO = {("2b", "v5p"): 2, ("2b", "h100"): 4, ("2b", "h200"): 2, ("2b", "v5e"): 16, ("2b", "v6e"): 8,
         ("1.3b", "v5e"): 16, ("1.3b", "v6e"): 8, ("1.3b", "h100"): 4, ("1.3b", "v5p"): 2, ("1.3b", "h200"): 2,
         ("0.77b", "v5e"): 8, ("0.77b", "v6e"): 4, ("0.77b", "h100"): 2, ("0.77b", "v5p"): 1,
         ("0.35b", "v5e"): 4, ("0.35b", "v6e"): 2, ("0.35b", "h100"): 2, ("0.12b", "v5e"): 2,
         ("moe_2b_a0.6b", "v5e"): 8, ("moe_2b_a0.6b", "v6e"): 4, ("moe_2b_a0.6b", "h100"): 2}


def rows() -> list[str]:
  dense = [f"{s}_{f}/{impl}" for s in SIZES for f in ("swiglu", "bimoa") for impl in ("xla", "pallas")]
  return dense + [f"{s}_{f}/xla" for s in MOE for f in ("swiglu", "bimoa")]


def parse_key(key: str) -> dict:
  """'0.12b_bimoa/xla+attn_xla/v5p:2x2x2' -> size, ffn, impl, attention, target."""
  row, impl, target = key.split("/")
  size, ffn = row.rsplit("_", 1)
  impl, _, attn = impl.partition("+attn_")
  return {"size": size, "ffn": ffn, "impl": impl, "attention": attn or "auto", "target": target}


def overrides(key: str) -> dict:
  from moa_jax.aot import targets

  k = parse_key(key)
  t = targets.parse(k["target"])
  moe = k["size"].startswith("moe_")
  out = {"mesh.data": 1, "mesh.fsdp": 1 if moe else t.chips, "mesh.expert": t.chips if moe else 1,
         "train.microbatches": MICRO.get((k["size"], t.kind), 1), "model.ffn.impl": k["impl"]}
  if k["attention"] != "auto":
    out["model.attention_impl"] = k["attention"]
  return out


def command(key: str) -> str:
  k = parse_key(key)
  flags = " ".join(f"--config.{name}={value}" for name, value in overrides(key).items())
  return (f"python -m moa_jax.train --config=configs/lm.py:size={k['size']},ffn={k['ffn']} --compile_only "
          f"--target={k['target']} {flags}")


def compile_cell(key: str, hlo_dir: str = "") -> dict:
  """Compiles one cell in this process; a record for the JSON (does-not-fit is a record, not a crash)."""
  from moa_jax import presets
  from moa_jax.aot import compiled, targets

  k = parse_key(key)
  config = presets.from_string(f"size={k['size']},ffn={k['ffn']}")
  for name, value in overrides(key).items():
    group, field = name.rsplit(".", 1)
    node = config
    for part in group.split("."):
      node = node[part]
    node[field] = value
  record = {"key": key, "command": command(key), "microbatches": config.train.microbatches,
            "batch": config.train.batch_size, "seq_len": config.train.seq_len}
  start = time.perf_counter()
  try:
    r = compiled.compile_for_target(config, k["target"])
  except targets.TargetError as e:
    return {**record, "fits": False, "error": str(e), "wall_seconds": time.perf_counter() - start}
  r.pop("suggestion", None)
  hlo_text = r.pop("hlo")
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(hlo_dir, key.replace("/", "__").replace(":", "_") + ".hlo.gz"), "wt") as f:
      f.write(hlo_text)
  return {**record, **r, "wall_seconds": time.perf_counter() - start}


def load() -> dict:
  if not os.path.exists(RESULTS):
    return {}
  with open(RESULTS) as f:
    return json.load(f)


def store(record: dict) -> None:
  results = load()
  results[record["key"]] = record
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  tmp = RESULTS + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, RESULTS)


def cell_text(r: dict | None, key: str, ratio: float | None) -> str:
  if r is None:
    return f"not compiled yet: `--compile={key}`"
  mesh = ",".join(f"{a}{v}" for a, v in r.get("mesh", {}).items() if v > 1)
  if "error" in r:
    return f"does not fit ({r['error'].split(': ', 1)[-1][:90]})"
  per_chip = r["batch"] // r["chips"]
  text = (f"{mesh}, {per_chip}/chip in {r['microbatches']} mb: {r['memory']['total'] / 2**30:.1f} GiB "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
  roof = r.get("roofline") or {}
  if roof and roof.get("unknown_loops"):
    text += ", roofline n/a (loops of unknown trip count)"
  elif roof:
    text += f", {roof['step_seconds']:.2f} s/step, MFU {100 * roof['mfu']:.0f}%"
    if ratio:
      text += f" (bi-MoA/SwiGLU ×{ratio:.2f})"
  return text


def table(results: dict) -> str:
  lines = ["| preset / impl | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
  for row in rows():
    cells = []
    for target in TARGETS:
      key = f"{row}/{target}"
      r = results.get(key)
      base = results.get(key.replace("_bimoa/", "_swiglu/")) if "_bimoa/" in key else None
      ratio = None
      known = lambda x: x and (x.get("roofline") or {}) and not x["roofline"].get("unknown_loops")
      if known(r) and known(base):
        ratio = r["roofline"]["step_seconds"] / base["roofline"]["step_seconds"]
      cells.append(cell_text(r, key, ratio))
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  extra = sorted(k for k in results if k.rsplit("/", 1)[0] not in rows())
  if extra:
    lines += ["", "Other compiled cells:", ""]
    lines += [f"- `{k}`: {cell_text(results[k], k, None)}" for k in extra]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--compile", default="", help="comma-separated cell keys, or all")
  p.add_argument("--list", action="store_true")
  p.add_argument("--hlo_dir", default="", help="also keep each compiled cell's optimized HLO here (gzip)")
  p.add_argument("--cell", default="", help=argparse.SUPPRESS)  # internal: one cell, JSON to stdout
  a = p.parse_args()
  if a.cell:
    print("RECORD " + json.dumps(compile_cell(a.cell, a.hlo_dir)))
    return
  every = [f"{row}/{t}" for row in rows() for t in TARGETS]
  if a.list:
    print("\n".join(f"{k}\n  {command(k)}" for k in every))
    return
  keys = [k for k in every if k not in load()] if a.compile == "all" else [k for k in a.compile.split(",") if k]
  for key in keys:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, f"--cell={key}", f"--hlo_dir={a.hlo_dir}"], capture_output=True,
                         text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RECORD ")), None)
    if line is None:
      tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
      print(f"{key}: failed ({tail[:300]})", flush=True)
      continue
    store(json.loads(line[len("RECORD "):]))
    print(f"{key}: stored ({time.perf_counter() - start:.0f} s)", flush=True)
  print(table(load()))


if __name__ == "__main__":
  main()
