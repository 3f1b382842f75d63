"""What a study holds equal between arms: tokens, training FLOPs or wall-clock time.

    budget = "tokens"      every arm trains on its size's token budget (tokens per parameter), except
                           an arm with `compute_of=X`, which gets the steps X's FLOPs buy at its own
                           (cheaper) cost: an equal-compute arm beside equal-token ones
    budget = "flops"       every arm trains on the FLOPs the reference arm (`budget_arm`, default the
                           baseline; an arm's `compute_of` wins) spends on its token budget
    budget = "wall_clock"  the same in seconds, from `throughput`: each arm's tokens/s measured alone
                           on the machine (not side by side with other runs): e.g. the
                           tokens/s column of a short study on the idle target machine
                           (--study.steps=200 --study.tune_seeds= --study.seeds=0; the runner
                           trains one run at a time)

An arm's steps are then round(reference steps × cost per token of the reference / the arm's own), so
an arm that is 0.86× as fast as the reference trains 1/0.86 × as many steps under an equal budget.
"""

from __future__ import annotations

from typing import Callable, Mapping

BUDGETS = ("tokens", "flops", "wall_clock")


class BudgetError(ValueError):
  """A budget the study cannot apply; the message names the field and the fix."""


def check(budget: str, arms: Mapping[str, object], throughput: Mapping[str, float], budget_arm: str) -> None:
  """Refuses an unknown budget, a wall-clock budget without a measured speed per arm, and a reference
  that is not an arm."""
  if budget not in BUDGETS:
    raise BudgetError(f"budget = {budget!r}; known: {', '.join(BUDGETS)}")
  refs = [budget_arm] + [getattr(a, "compute_of", "") for a in arms.values()]
  for ref in refs:
    if ref and ref not in arms:
      raise BudgetError(f"budget reference {ref!r} is not an arm; arms: {', '.join(arms)}")
  if budget == "wall_clock":
    missing = [a for a in arms if not throughput.get(a, 0) > 0]
    if missing:
      raise BudgetError(f"budget = 'wall_clock' needs throughput (tokens/s, each arm measured alone on the "
                        f"target machine) for {missing}; e.g. throughput={{{missing[0]!r}: 12000.0, ...}}")


def reference(budget: str, arm: str, compute_of: str, budget_arm: str) -> str:
  """The arm whose run sets this arm's budget ('' : its own token budget)."""
  if compute_of:
    return compute_of
  return "" if budget == "tokens" or arm == budget_arm else budget_arm


def matched_steps(own_cost: float, ref_cost: float, ref_steps: int) -> int:
  """Steps at which a run costing own_cost per token spends what ref_steps cost at ref_cost."""
  return max(1, round(ref_steps * ref_cost / own_cost))


def cost_per_token(budget: str, arm: str, flops_per_token: float, throughput: Mapping[str, float]) -> float:
  """FLOPs per token (tokens and flops budgets: an equal-compute arm matches FLOPs), or seconds per token."""
  return 1.0 / throughput[arm] if budget == "wall_clock" else flops_per_token


def steps(budget: str, arm: str, compute_of: str, budget_arm: str, throughput: Mapping[str, float],
          own: tuple[int, float], ref: Callable[[str], tuple[int, float]]) -> int:
  """This arm's steps. own: (its token-budget steps, its FLOPs per token); ref(name): the same for an arm."""
  other = reference(budget, arm, compute_of, budget_arm)
  if not other:
    return own[0]
  ref_steps, ref_flops = ref(other)
  return matched_steps(cost_per_token(budget, arm, own[1], throughput),
                       cost_per_token(budget, other, ref_flops, throughput), ref_steps)
