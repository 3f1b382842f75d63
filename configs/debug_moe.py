"""Tiny MoE with bi-MoA experts (8 experts, top-2, every layer) that trains in seconds on a CPU.

Run:
  python -m moa_jax.train --config=configs/debug_moe.py --workdir=/tmp/moa_debug_moe
  # expert parallelism over 4 (fake) devices: experts sharded 2 per device, tokens all-to-all
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m moa_jax.train \
      --config=configs/debug_moe.py --config.mesh.expert=4 --workdir=/tmp/moa_debug_moe_ep4
  python -m moa_jax.summary --config=configs/debug_moe.py
Expect: 0.66M parameters, 0.21M active per token; lm_loss falls from ~6.2 (ln 512) to ~4.4 in 200
steps (a minute or two on 2 CPU cores); metrics.jsonl also has aux_loss (the mean over MoE layers:
≈ 1 when balanced), seq_aux_loss (the same per sequence), z_loss, expert_load_max/min per layer (0.125 when
balanced), with expert parallelism ep_overflow_* (0: never drops by default)
and the experts' mean gates ("moe.mix", "moe.mix_u"). The capacity path
(--config.model.moe.path=capacity) adds dropped_fraction.
"""

from moa_jax import presets


def get_config():
  c = presets.lm_config(size="debug_moe", ffn="bimoa")
  c.data.max_bytes = 2_000_000  # the same 2 MB corpus slice as configs/debug.py
  return c
