"""What a study declares: its arms (Arm), sizes, seeds, budgets and comparisons (Study), checked when
it is built, and the dotted config overrides it applies. A study file (experiments/*.py) returns one
from get_study(); moa_jax.study runs it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from moa_jax import budget, presets


class StudyError(ValueError):
  """A study that cannot run as written; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: an FFN preset (presets.FFN_PRESETS) and config overrides {"model.ffn.gate": "softmax"}.

  match_flops: another FFN preset; this arm's FFN width d_ff is set so that its training FLOPs per
  token equal that preset's at the same size (e.g. a SwiGLU widened to bi-MoA's FLOPs), and it trains
  on that preset's token budget: an equal-compute arm.
  compute_of: another arm's name; this arm trains on that arm's compute (FLOPs, or seconds under a
  wall_clock budget): more steps when it is cheaper (moa_jax.budget), e.g. an equal-compute SwiGLU.
  """
  ffn: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  match_flops: str = ""
  compute_of: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  arms: Mapping[str, Arm | tuple | str]   # arm name -> Arm, (ffn, {path: value}) or ffn
  baseline: str                           # the arm every other arm is compared with, seed by seed
  sizes: tuple[str, ...] = ("quickstart",)  # presets.SIZES; each arm runs at each size
  seeds: tuple[int, ...] = (0, 1, 2)      # evaluation seeds (train.seed: init and data order)
  steps: int = 0                          # optimizer steps per run; 0: from the tokens per parameter
  tokens_per_param: float = 0.0           # > 0: steps = ceil(this × parameters / tokens per step);
                                          # 0: the config's train.tokens_per_param (20)
  budgets: tuple[float, ...] = ()         # several tokens-per-parameter budgets: each size runs at each,
                                          # as the size label "SIZE@TPP" (the report shows Δ by budget)
  lr_multipliers: tuple[float, ...] = (1.0,)  # each arm at these multiples of its base optim.lr; with
                                          # tune_seeds, the starting grid of each arm's lr search
  tune_seeds: tuple[int, ...] = ()        # seeds the lr is tuned on, apart from `seeds`; empty: no tuning
  widen: int = 2                          # grid points a tuning search may add beyond an edge optimum
  final_evals: int = 1                    # the final loss: the mean of the run's last this many evals
  primary: tuple[str, ...] = ()           # (arm, other): the comparison the study exists to make
  comparisons: tuple[tuple[str, str], ...] = ()  # (arm, other) pairs; default: every arm vs baseline
  effect: float = 0.01                    # the effect (nats) the power line asks seeds for
  pilot_sd: float = 0.0                   # > 0: a paired SD (nats) from an earlier study, for an a-priori
                                          # power line (what the planned seeds can detect) before any data
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every run (arms' win)
  budget: str = "tokens"                  # held equal between arms: tokens | flops | wall_clock (budget.py)
  budget_arm: str = ""                    # flops / wall_clock: the arm whose run sets it (default: baseline)
  throughput: Mapping[str, float] = dataclasses.field(default_factory=dict)  # wall_clock: arm -> tokens/s,
                                          # each measured alone on the machine
  equal_grid: bool = True                 # tuned: every arm's lr grid ends with as many points
  margin: float = 0.05                    # the equivalence margin (nats) of the TOST, declared in advance
  document_se: bool = True                # the report re-evaluates each evaluation run's final checkpoint
                                          # per document (moa_jax.heldout): SEs over documents
  description: str = ""                   # the report's preamble (default: the file's docstring)

  def __post_init__(self):
    arms = {name: _arm(name, a) for name, a in self.arms.items()}
    object.__setattr__(self, "arms", arms)
    for field in ("sizes", "seeds", "lr_multipliers", "tune_seeds", "primary", "budgets"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    if self.budgets:
      if self.steps or self.tokens_per_param:
        raise StudyError(f"study {self.name!r}: budgets sets the tokens per parameter; leave steps and tokens_per_param at 0")
      if any(not b > 0 for b in self.budgets):
        raise StudyError(f"study {self.name!r}: budgets {self.budgets} must be positive tokens per parameter")
      object.__setattr__(self, "sizes", tuple(dict.fromkeys(
          s if "@" in s else f"{s}@{b:g}" for s in self.sizes for b in self.budgets)))
    object.__setattr__(self, "comparisons", tuple(tuple(c) for c in self.comparisons))
    if self.baseline not in arms:
      raise StudyError(f"study {self.name!r}: baseline = {self.baseline!r} is not an arm; arms: {', '.join(arms)}")
    try:
      budget.check(self.budget, arms, self.throughput, self.budget_arm or self.baseline)
    except budget.BudgetError as e:
      raise StudyError(f"study {self.name!r}: {e}") from None
    for size in self.sizes:
      if preset_size(size) not in presets.RUN_SHAPES:
        raise StudyError(f"study {self.name!r}: size {size!r}; known: {', '.join(presets.RUN_SHAPES)}")
    if not self.sizes or not self.seeds or not self.lr_multipliers:
      raise StudyError(f"study {self.name!r}: sizes, seeds and lr_multipliers must each be non-empty")
    if len(set(self.seeds)) < len(self.seeds) or len(set(self.tune_seeds)) < len(self.tune_seeds):
      raise StudyError(f"study {self.name!r}: seeds {self.seeds} / tune_seeds {self.tune_seeds} repeat a seed")
    if set(self.seeds) & set(self.tune_seeds):
      raise StudyError(f"study {self.name!r}: seeds {sorted(set(self.seeds) & set(self.tune_seeds))} are both "
                       f"tuning and evaluation seeds; keep tune_seeds apart (e.g. 100, 101)")
    if any(m <= 0 for m in self.lr_multipliers):
      raise StudyError(f"study {self.name!r}: lr_multipliers {self.lr_multipliers} must be positive")
    if self.steps and self.tokens_per_param:
      raise StudyError(f"study {self.name!r}: set steps or tokens_per_param, not both")
    if self.final_evals < 1 or self.widen < 0:
      raise StudyError(f"study {self.name!r}: final_evals = {self.final_evals} must be ≥ 1, widen = {self.widen} ≥ 0")
    for pair in ((self.primary,) if self.primary else ()) + self.comparisons:
      if len(pair) != 2 or any(a not in arms for a in pair) or pair[0] == pair[1]:
        raise StudyError(f"study {self.name!r}: comparison {pair} must name two different arms of {', '.join(arms)}")

  @property
  def tuned(self) -> bool:
    return bool(self.tune_seeds)

  def declared_comparisons(self) -> list[tuple[str, str]]:
    """The primary comparison first, then the others (default: every arm against the baseline)."""
    pairs = list(self.comparisons) or [(a, self.baseline) for a in self.arms if a != self.baseline]
    if self.primary:
      pairs = [tuple(self.primary)] + [p for p in pairs if p != tuple(self.primary)]
    return [p for p in pairs if p[0] in self.arms and p[1] in self.arms]


def _arm(name: str, arm) -> Arm:
  if isinstance(arm, str):
    arm = Arm(arm)
  elif isinstance(arm, tuple):
    arm = Arm(*arm)
  for ffn in (arm.ffn, arm.match_flops or arm.ffn):
    if ffn not in presets.FFN_PRESETS:
      raise StudyError(f"arm {name!r}: ffn = {ffn!r}; known: {', '.join(presets.FFN_PRESETS)}")
  return arm


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted paths ("model.ffn.gate") in place; an unknown path is an error, not a new field."""
  for path, value in overrides.items():
    node, keys = config, path.split(".")
    for i, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        where = ".".join(keys[:i]) or "the config"
        known = ", ".join(node.keys()) if isinstance(node, ml_collections.ConfigDict) else "(not a group)"
        raise StudyError(f"override {path!r}: {where} has no field {key!r}; known: {known}")
      if i < len(keys) - 1:
        node = node[key]
    node[keys[-1]] = tuple(value) if isinstance(value, list) else value


def preset_size(size: str) -> str:
  """"debug@20" (a size at a token budget, Study.budgets) -> "debug"."""
  return size.partition("@")[0]
