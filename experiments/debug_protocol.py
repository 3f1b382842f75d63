"""SwiGLU vs bi-LA vs bi-MoA on the debug model under the full protocol: 20 tokens per parameter, each
arm's lr tuned on its own seed, three paired evaluation seeds, Holm-corrected comparisons, a power line.

Run (CPU; see the plan below for the time):
  python -m moa_jax.study experiments/debug_protocol.py --workdir=runs/debug_protocol \
      --out=experiments/results/debug_protocol
The plan: the debug model (0.13M parameters, 512-token BPE on 8 MB of the stdlib) trained for
20 tokens per parameter = 1,284 steps × 16 × 128 tokens (2.6M tokens, under one epoch), cosine with
5% warmup, 10 evals on the whole validation split (74k tokens), final loss = mean of the last 2.
LR tuning: tune seed 100, grid 0.5×, 1×, 2× of 3e-3, widened while the best is at an edge (at most
2 more points): 9-15 tuning runs. Then seeds 0, 1, 2 at each arm's best: 9 runs. 18-24 runs in all,
47M training tokens (63M at most): --plan --tokens_per_sec=16000 (the unloaded 2-core mean of
tiny_mixing's arms; bi-MoA runs at less than half SwiGLU's speed on a CPU) gives ~50 min of training
(~66 min at most), plus evals (~10%) and one compile per arm and lr. Measured (2026-11-29): 13 tuning
+ 9 evaluation runs in 72 min wall-clock with the arms run side by side (--study.arms=A
--study.baseline=A, one process each), on 2 cores shared with other work; see the result's README.
Primary comparison: bi-MoA − SwiGLU; also bi-MoA − bi-LA (two parametrisations, not token adaptivity
alone: the sigmoid-LA control in debug_protocol_v2.py isolates that) and bi-LA − SwiGLU, Holm-corrected
over the three.
Expect: differences of hundredths of a nat at most at this size; the power table says what three
seeds can and cannot detect. This is a protocol exercise at toy scale, not evidence about MoA at 0.1B+.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="debug_protocol",
      sizes=("debug",),
      arms={"swiglu": "swiglu", "bila": "bila", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2),
      tune_seeds=(100,),
      lr_multipliers=(0.5, 1.0, 2.0),
      widen=2,
      final_evals=2,
      primary=("bimoa", "swiglu"),
      comparisons=(("bimoa", "swiglu"), ("bimoa", "bila"), ("bila", "swiglu")),
      effect=0.01,
      pilot_sd=0.023,  # bi-MoA − SwiGLU's paired SD in tiny_mixing's first result (400 steps, 3 seeds);
                       # its 2026-11-29 rerun measured 0.029
  )
