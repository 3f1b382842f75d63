"""The range of every numeric config field, checked before anything compiles or is written.

One table: field -> (low, high, what the value means). Bounds are inclusive unless written as open
bounds `(x,)` (strictly above, or below, x); `high` None: no upper bound. A value outside its range trains silently
in the wrong direction (a negative learning rate climbs the loss), divides by zero late, or means
nothing (a negative step count), so the run stops with one line naming the field, its range and meaning.
Fields a config lacks (an older or smaller config) are not checked.
"""

from __future__ import annotations

RANGES = {
    "optim.lr": ((0,), None, "the peak learning rate; a negative one trains uphill"),
    "optim.warmup_steps": (0, None, "steps of linear warmup"),
    "optim.min_lr_ratio": (0, 1, "final lr / peak lr"),
    "optim.decay_fraction": (0, 1, "the fraction of steps wsd spends decaying"),
    "optim.b1": (0, (1,), "Adam's first-moment decay"),
    "optim.b2": (0, (1,), "Adam's second-moment decay"),
    "optim.eps": ((0,), None, "Adam's ε"),
    "optim.weight_decay": (0, None, "decoupled weight decay; a negative one grows the weights"),
    "optim.clip_norm": (0, None, "the gradient-norm clip, 0: off"),
    "train.steps": (1, None, "optimizer steps"),
    "train.batch_size": (1, None, "sequences per step"),
    "train.seq_len": (1, None, "tokens per sequence"),
    "train.log_every": (1, None, "steps between metric records"),
    "train.eval_every": (0, None, "steps between evaluations, 0: only at the end"),
    "train.eval_batches": (1, None, "validation batches per evaluation"),
    "train.eval_tokens": (0, None, "validation tokens per evaluation, 0: use eval_batches"),
    "train.tokens_per_param": (0, None, "a study run's tokens per parameter"),
    "train.sample_every": (0, None, "steps between samples, 0: never"),
    "train.seed": (0, None, "the init and data-order seed"),
    "train.resume_step": (0, None, "the checkpoint to resume, 0: the newest"),
    "train.microbatches": (1, None, "gradient-accumulation microbatches"),
    "train.loss_chunk": (0, None, "positions per cross-entropy chunk, 0: whole sequence"),
    "data.val_percent": (0, 100, "percent of documents held out for validation"),
    "data.max_bytes": (0, None, "the cap on text read, 0: all"),
    "loss_weights.aux_loss": (0, None, "the MoE balance loss weight"),
    "loss_weights.z_loss": (0, None, "the MoE router z-loss weight"),
    # model.moe.buffer_factor: checked by moe/spec.py (negative: never drop; 0 is refused)
    "checkpoint.every": (0, None, "steps between saves, 0: only at the end"),
    "model.vocab_size": (1, None, "the vocabulary"),
    "model.d_model": (1, None, "the residual width"),
    "model.n_layers": (1, None, "decoder blocks"),
    "model.n_heads": (1, None, "query heads"),
    "model.n_kv_heads": (1, None, "key/value heads"),
    "model.head_dim": (0, None, "0: d_model // n_heads"),
    "model.rope_theta": ((0,), None, "the RoPE base"),
    "model.norm_eps": ((0,), None, "the RMSNorm ε"),
    "model.ffn.d_ff": (1, None, "the FFN hidden width"),
    "model.moe.num_experts": (0, None, "routed experts, 0: dense"),
    "model.moe.top_k": (1, None, "experts per token"),
    "model.moe.every": (1, None, "MoE in every N-th layer"),
    "model.moe.shared_experts": (0, None, "always-on experts"),
    "model.moe.d_ff_expert": (0, None, "the expert width, 0: model.ffn.d_ff"),
    "model.moe.capacity_factor": ((0,), None, "slots per expert over the balanced load"),
    "model.moe.bias_rate": (0, None, "the loss-free balancing bias step γ, 0: off"),
    "model.moe.routed_scale": ((0,), None, "the routed experts' output scale"),
    "loss_weights.seq_aux_loss": (0, None, "the per-sequence MoE balance loss weight"),
}


def _get(config, path: str):
  node = config
  for key in path.split("."):
    if not hasattr(node, "get") or key not in node:
      return None
    node = node[key]
  return node


def problem(path: str, value) -> str | None:
  """Why `value` is out of `path`'s range, or None."""
  low, high, what = RANGES[path]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  lo, hi = (low[0] if isinstance(low, tuple) else low), (high[0] if isinstance(high, tuple) else high)
  below = value <= lo if isinstance(low, tuple) else value < lo
  above = hi is not None and (value >= hi if isinstance(high, tuple) else value > hi)
  if value != value or below or above:  # value != value: NaN
    if hi is None:
      need = f"> {lo}" if isinstance(low, tuple) else f"≥ {lo}"
    else:
      need = f"in {'(' if isinstance(low, tuple) else '['}{lo}, {hi}{')' if isinstance(high, tuple) else ']'}"
    return f"{path} = {value}; must be {need} ({what})"
  return None


def check_ranges(config) -> None:
  """Raises ValueError for the first numeric field outside its range."""
  for path in RANGES:
    why = problem(path, _get(config, path))
    if why:
      raise ValueError(why)
