"""Model sizes and FFN variants as two small tables, and the full training config built from them.

`lm_config(size="1.3b", ffn="bimoa")` returns the ml_collections.ConfigDict every entry point reads
(`configs/*.py` are thin wrappers). Fixed, LA and MoA variants of one size share every matmul shape:
they differ only by the mixing coefficients / gate parameters. MoE sizes (`MOE_SIZES`, named by total
and active parameters) make every layer an MoE whose experts are FFNs of the chosen variant.
"""

from __future__ import annotations

import math

import ml_collections

from moa_jax.activations import PAPER_DICTIONARY

# name: (d_model, n_layers, n_heads, n_kv_heads, vocab, tie_embeddings, GLU width multiple, peak lr)
SIZES = {
    "debug": (64, 2, 4, 2, 512, True, 32, 3e-3),
    "quickstart": (320, 6, 5, 5, 8192, True, 64, 2e-3),
    "0.12b": (768, 12, 12, 12, 32000, True, 256, 1e-3),
    "0.35b": (1024, 24, 16, 16, 32000, True, 256, 6e-4),
    "0.77b": (1536, 24, 12, 12, 32000, False, 256, 4e-4),
    "1.3b": (2048, 24, 16, 16, 32000, False, 256, 3e-4),
    "2b": (2560, 24, 20, 20, 32000, False, 256, 2.5e-4),
}

# MoE sizes, named by total and active parameters (vocab 32k): the dense columns above, then
# (experts, top_k). Expert width = the dense GLU width (F ≈ 8/3·d); MoE in every layer.
MOE_SIZES = {
    "debug_moe": (64, 2, 4, 2, 512, True, 32, 3e-3, 8, 2),
    "moe_0.25b_a0.09b": (512, 12, 8, 8, 32000, True, 256, 1e-3, 8, 2),
    "moe_0.5b_a0.17b": (768, 12, 12, 12, 32000, True, 256, 8e-4, 8, 2),
    "moe_1b_a0.3b": (1024, 13, 16, 16, 32000, True, 256, 6e-4, 8, 2),
    "moe_2b_a0.6b": (1024, 26, 16, 16, 32000, False, 256, 4e-4, 8, 2),
}

# The run shape a study trains each dense size at (moa_jax.study; docs/research_protocol.md): sequences per step, tokens
# per sequence, warmup as a fraction of the steps, evaluations per run, and config overrides. The
# steps come from train.tokens_per_param (20 by default). Debug reads 8 MB of the stdlib (3.7M train,
# 75k val tokens at its 512-token BPE), so 20 tokens per parameter (2.6M) is under one epoch.
RUN_SHAPES = {
    "debug": dict(batch_size=16, seq_len=128, warmup_fraction=0.05, evals=10,
                  overrides={"data.max_bytes": 8_000_000}),
    "quickstart": dict(batch_size=32, seq_len=256, warmup_fraction=0.05, evals=10, overrides={}),
    "0.12b": dict(batch_size=256, seq_len=2048, warmup_fraction=0.02, evals=20, overrides={}),
    "0.35b": dict(batch_size=256, seq_len=2048, warmup_fraction=0.02, evals=20, overrides={}),
    "0.77b": dict(batch_size=512, seq_len=2048, warmup_fraction=0.02, evals=20, overrides={}),
    "1.3b": dict(batch_size=512, seq_len=2048, warmup_fraction=0.02, evals=20, overrides={}),
    "2b": dict(batch_size=512, seq_len=2048, warmup_fraction=0.02, evals=20, overrides={}),
}
# MoE rungs join a ladder at the run shape of the dense size they share d_model with (debug_moe: debug's).
RUN_SHAPES.update({name: RUN_SHAPES["debug" if name == "debug_moe" else "0.35b"] for name in MOE_SIZES})

_K7 = PAPER_DICTIONARY
# name: FFN fields. Type-I ("mlp") variants use F = 4·d, Type-II ("glu") F ≈ 8/3·d: equal matmul params.
FFN_PRESETS = {
    "gelu_mlp": dict(type="mlp", mix="fixed", activations=("gelu_tanh",), primary="gelu_tanh"),
    "relu_mlp": dict(type="mlp", mix="fixed", activations=("relu",), primary="relu"),
    "relu2_mlp": dict(type="mlp", mix="fixed", activations=("relu2",), primary="relu2"),
    "silu_mlp": dict(type="mlp", mix="fixed", activations=("silu",), primary="silu"),
    "la_mlp": dict(type="mlp", mix="la", activations=_K7, primary="gelu_tanh"),
    "moa_mlp": dict(type="mlp", mix="moa", activations=_K7, primary="gelu_tanh"),
    "swiglu": dict(type="glu", mix="fixed", activations=("silu",), primary="silu"),
    "geglu": dict(type="glu", mix="fixed", activations=("gelu_tanh",), primary="gelu_tanh"),
    "reglu": dict(type="glu", mix="fixed", activations=("relu",), primary="relu"),
    "la": dict(type="glu", mix="la", activations=_K7, primary="silu"),
    "moa": dict(type="glu", mix="moa", activations=_K7, primary="silu"),
    "bila": dict(type="glu", mix="la", activations=_K7, primary="silu", sides="bi"),
    "bimoa": dict(type="glu", mix="moa", activations=_K7, primary="silu", sides="bi"),
}


def ffn_width(ffn_type: str, d_model: int, multiple: int) -> int:
  if ffn_type == "mlp":
    return 4 * d_model
  return multiple * math.ceil(8 * d_model / 3 / multiple)


def _pick(table: dict, field: str, value: str):
  if value not in table:
    raise ValueError(f"{field} = {value!r}; known: {', '.join(table)}")
  return table[value]


def ffn_config(ffn: str, d_model: int, multiple: int) -> ml_collections.ConfigDict:
  preset = dict(_pick(FFN_PRESETS, "ffn", ffn))
  return ml_collections.ConfigDict(dict(
      type=preset["type"],                       # mlp: Type-I W3·σ(W1x); glu: Type-II W3·(σ(W1x)⊙W2x)
      mix=preset["mix"],                         # fixed | la (per-layer coefficients) | moa (per-token gates)
      activations=tuple(preset["activations"]),  # the dictionary σ_1..σ_K (names from moa_jax.activations)
      primary=preset["primary"],                 # activation that dominates at init (LA: exactly)
      sides=preset.get("sides", "one"),          # glu: one (mix σ(W1x) only) | bi (mix both branches)
      primary_u="identity",                      # bi-sided: dominant activation of the W2 branch at init
      gate="sigmoid",                            # moa gate φ: sigmoid | softmax | tanh
      gate_bias=True,                            # moa: π = φ(Ux + b); with U = 0 this is LA
      gate_bias_init=4.0,                        # moa: logit margin of `primary` at init
      groups=1,                                  # channel groups G, each with its own gates
      d_ff=ffn_width(preset["type"], d_model, multiple),  # hidden width F
      impl="xla",                                # mixing: xla | pallas (mixing kernel) | fused (in the matmul)
  ))


def moe_config(num_experts: int = 0, top_k: int = 2) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_experts=num_experts,                   # routed experts E (0: a dense model, the rest unused)
      top_k=top_k,                               # experts per token
      every=1,                                   # MoE in every N-th layer (1: all); n_layers % every == 0
      router="softmax",                          # router scores: softmax | sigmoid
      normalize_topk=True,                       # top_k > 1: renormalise the chosen scores (top-1: raw score)
      shared_experts=0,                          # always-on experts (one FFN of shared_experts × expert width)
      d_ff_expert=0,                             # expert hidden width (0: model.ffn.d_ff); variant: model.ffn
      path="dropless",                           # dropless (grouped matmuls) | capacity (fixed (E, C, D) buffers)
      capacity_factor=1.25,                      # capacity path: slots per expert = ⌈factor·tokens·top_k/E⌉
      gmm="auto",                                # grouped matmul: auto | tokamax | megablox | ragged_dot
      buffer_factor=-1.0,                        # expert parallelism: rows a device may receive / balanced
                                                 # (< 0: the worst case, never drops; > 0: a cap, drops by
                                                 # fair share per expert, then priority)
      bias_rate=0.0,                             # loss-free balancing: router bias step γ (0: off; DeepSeek-V3 0.001)
      routed_scale=1.0,                          # routed experts' output scale before the shared experts' is added
      transport="auto",                          # exchange: auto (padded on CPU, ragged elsewhere) | ragged | padded
  ))


def lm_config(size: str = "debug", ffn: str = "swiglu") -> ml_collections.ConfigDict:
  row = _pick({**SIZES, **MOE_SIZES}, "size", size)
  d, layers, heads, kv_heads, vocab, tie, multiple, lr = row[:8]
  tiny = size in ("debug", "quickstart", "debug_moe")
  debug = size in ("debug", "debug_moe")
  from moa_jax.data import default_data_config  # the data group is owned by moa_jax.data

  c = ml_collections.ConfigDict()
  c.name = f"{size}_{ffn}"                       # run name (used in logs and study reports)
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=vocab,                          # must be ≥ the tokenizer's vocabulary
      d_model=d,                                 # residual width
      n_layers=layers,                           # decoder blocks (scanned)
      n_heads=heads,                             # query heads
      n_kv_heads=kv_heads,                       # key/value heads (GQA when < n_heads)
      head_dim=0,                                # 0: d_model // n_heads
      rope_theta=10_000.0,                       # RoPE base
      norm_eps=1e-6,                             # RMSNorm epsilon
      tie_embeddings=tie,                        # share input embedding and output projection
      dtype="float32" if debug else "bfloat16",  # compute dtype (debug: fp32, so tests compare to rounding)
      param_dtype="float32",                     # parameter (and optimizer state) dtype
      remat="save_dots_no_batch",                # remat policy: none | full | save_dots | save_dots_no_batch | save_dots_moe_io
      attention_impl="auto",                     # auto (splash on TPU, cudnn on GPU, else xla) | xla | cudnn | splash
  ))
  c.model.ffn = ffn_config(ffn, d, multiple)
  c.model.moe = moe_config(*row[8:])
  c.loss_weights = ml_collections.ConfigDict(dict(
      aux_loss=0.01,                             # MoE load-balancing loss weight (loss: mean over MoE layers)
      seq_aux_loss=0.0,                          # the same loss per sequence (DeepSeek-V3's; 0: logged only)
      z_loss=0.001,                              # MoE router z-loss weight (loss: mean over MoE layers)
  ))
  c.data = default_data_config()
  if tiny:
    c.data.max_bytes = 0 if size == "quickstart" else 2_000_000  # debug sizes read a 2 MB slice
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",                              # adamw | muon (muon for matrices, adamw for the rest)
      lr=lr,                                     # peak learning rate
      schedule="cosine",                         # cosine | wsd | constant (all after linear warmup)
      warmup_steps=10 if tiny else 1000,         # linear warmup from 0
      min_lr_ratio=0.1,                          # final lr / peak lr (cosine, wsd)
      decay_fraction=0.2,                        # wsd: fraction of steps spent decaying
      b1=0.9,                                    # Adam β1
      b2=0.95,                                   # Adam β2
      eps=1e-8,                                  # Adam ε
      weight_decay=0.1,                          # decoupled weight decay on matrices
      decay_mix_params=False,                    # also decay LA coefficients / MoA gates
      gate_lr_multiplier=1.0,                    # MoA gate weights U and biases b train at lr × this
      gate_kernel_trainable=True,                # False: U stays at its init, zero: gates σ(b) per layer
                                                 # (MoA without token adaptivity: the sigmoid-LA control)
      clip_norm=1.0,                             # global gradient-norm clip (0: off)
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=200 if tiny else 20_000,                                              # optimizer steps
      batch_size=8 if tiny else 256,                                              # global sequences per step
      seq_len=256 if size == "quickstart" else (64 if tiny else 2048),            # tokens per sequence
      log_every=10 if tiny else 50,              # steps between metric records
      eval_every=100 if tiny else 1000,          # steps between evaluations (0: only at the end)
      eval_batches=4 if tiny else 20,            # validation batches per evaluation (when eval_tokens = 0)
      eval_tokens=0 if tiny else 1 << 20,        # > 0: evaluate on this many tokens (or the whole split)
      tokens_per_param=20.0,                     # a study run's token budget (moa_jax.study sets steps from it)
      sample_every=50 if size == "quickstart" else (100 if tiny else 0),  # steps between samples (0: never)
      seed=0,                                    # parameter init and data order
      resume_step=0,                             # resume from this checkpoint, not the newest (0: newest);
                                                 # later ones move to checkpoints_superseded/
      allow_new_tokenizer=False,                 # resume even though data.* now makes another tokenizer
                                                 # (the embeddings are reused under the new ids)
      microbatches=1,                            # gradient accumulation: the batch runs as N scanned microbatches
                                                 # (batch_size % (N × data·fsdp·expert) == 0); MoE balance
                                                 # loss per microbatch
      loss_chunk=0 if tiny else 512,             # positions per cross-entropy chunk, so the (B, T, V) fp32 logits
                                                 # never exist at once (0 or ≥ seq_len: whole sequence;
                                                 # otherwise a divisor of seq_len)
      profile_steps=(0, 0),                      # (start, count): jax.profiler trace of these steps into
                                                 # WORKDIR/profile (count 0: off; step 1 compiles, start ≥ 2)
      profile_processes=(0,),                    # process indices that write a trace
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                                   # pure data parallelism (-1: fill the remaining devices)
      fsdp=1,                                    # parameters/optimizer sharded over this axis (ZeRO-3)
      tensor=1,                                  # tensor parallelism over heads and FFN width
      expert=1,                                  # expert parallelism (MoE)
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=100 if tiny else 1000,               # steps between saves (and one at the end)
      keep=3,                                    # newest checkpoints kept (≥ 1; the final one always)
  ))
  c.logging = ml_collections.ConfigDict(dict(
      wandb_project="",                          # Weights & Biases project ('': W&B off; needs `pip install wandb`)
      wandb_entity="",                           # W&B team or user ('': your default entity)
      wandb_run_name="",                         # W&B display name ('': the config's `name`)
      wandb_mode="",                             # online | offline | disabled ('': wandb's default, online)
  ))
  return c


def from_string(arg: str | None) -> ml_collections.ConfigDict:
  """Parses "size=1.3b,ffn=moa" (the `--config=configs/lm.py:size=1.3b,ffn=moa` form)."""
  kwargs = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in ("size", "ffn"):
      raise ValueError(f"config argument {item!r}; expected "
                       f"size=<{'|'.join([*SIZES, *MOE_SIZES])}>,ffn=<{'|'.join(FFN_PRESETS)}>")
    kwargs[key] = value
  return lm_config(**kwargs)
