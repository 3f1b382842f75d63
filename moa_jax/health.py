"""When a training state is fit to be saved: the rule that keeps blown-up parameters out of checkpoints.

A step is *healthy* when its loss and parameter norm are finite and neither has exploded against the
recent healthy history (the last `HISTORY` healthy steps, carried across resumes in the checkpoint):

    loss       ≤ LOSS_FACTOR · median(recent healthy losses)
    param_norm ≤ NORM_FACTOR · median(recent healthy parameter norms)

(no comparison until `MIN_HISTORY` healthy steps are known), and a loss that climbs from where the run
began is not healthy either:

    loss       ≤ RISE_FACTOR · median(the run's first START healthy losses)

The median follows a loss that rises steadily (a sign error or far too large a learning rate takes
the debug model from 6.25 to 10.5 in 40 steps without tripping the first rule), but the start does
not: a run that trains at all soon falls below its initial loss, which at random init is about
ln(vocabulary) and the worst a healthy run is ever expected to do. Normal training moves the median of
either by a few percent over 64 steps; a divergence multiplies the parameter norm within a step or
two (lr = 1e6 takes it from ~40 to ~1e7). An unhealthy step is not added to the history, so a
blow-up never becomes the reference. Training saves only at healthy steps; the last checkpoint saved
is the one an error message points back to.
"""

from __future__ import annotations

import collections
import math

import numpy as np

HISTORY = 64
MIN_HISTORY = 4
LOSS_FACTOR = 2.0
NORM_FACTOR = 2.0
START = 8
RISE_FACTOR = 1.1


class Health:
  def __init__(self, history: dict | None = None):
    history = history or {}
    self.loss = collections.deque(history.get("loss", []), maxlen=HISTORY)
    self.param_norm = collections.deque(history.get("param_norm", []), maxlen=HISTORY)
    # a history saved before the start was kept has none: that run's start is unknown, the rule is off
    self.start = list(history.get("start", [])) if "start" in history or not history.get("loss") else None

  def check(self, loss: float, param_norm: float) -> str | None:
    """Why this step is unhealthy, or None; a healthy step joins the history."""
    if not (math.isfinite(loss) and math.isfinite(param_norm)):
      return f"loss {loss:.4g}, param_norm {param_norm:.4g} (not finite)"
    if len(self.loss) >= MIN_HISTORY:
      ref_loss, ref_norm = float(np.median(self.loss)), float(np.median(self.param_norm))
      if loss > LOSS_FACTOR * ref_loss:
        return f"loss {loss:.4g} > {LOSS_FACTOR:g} × the recent median {ref_loss:.4g}"
      if param_norm > NORM_FACTOR * ref_norm:
        return f"param_norm {param_norm:.4g} > {NORM_FACTOR:g} × the recent median {ref_norm:.4g}"
    if self.start is not None and len(self.start) >= START:
      ref_start = float(np.median(self.start))
      if loss > RISE_FACTOR * ref_start:
        return (f"loss {loss:.4g} > {RISE_FACTOR:g} × {ref_start:.4g}, the median of the run's first {START} steps: "
                "it trains uphill (check optim.lr)")
    elif self.start is not None:
      self.start.append(float(loss))
    self.loss.append(float(loss))
    self.param_norm.append(float(param_norm))
    return None

  def state(self) -> dict:
    """The history, for the checkpoint's metadata."""
    state = {"loss": list(self.loss), "param_norm": list(self.param_norm)}
    return state if self.start is None else {**state, "start": self.start}
