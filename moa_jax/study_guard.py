"""What keeps a study's record true when studies, runs and signals meet.

- One study per study directory: a training study holds WORKDIR/lock (moa_jax.workdir) for as long as
  it runs, so a second study on the same directory stops with one line instead of racing the first for
  its runs. (--report_only takes no lock: it only reads runs, and writes the report.)
- Only a divergence marks a run failed (study_runs.FAILED): any other reason a run cannot go on (its lock
  held by a `train` started by hand, a refused resume) stops the study with one line.
- A failed.json beside a run that has finished (left by an older version, or by a race) is reconciled
  before anything reads it: moved to failed.superseded.json, with a note.
- Ctrl-C or SIGTERM during a run: training saves and stops (runtime.PreemptionGuard); the study then
  stops too, with one line saying how to resume, instead of going on to the next run.
"""

from __future__ import annotations

import functools
import glob
import json
import os

from moa_jax import cli, study_runs, validate
from moa_jax import workdir as workdir_lock

SUPERSEDED = "failed.superseded.json"


def locked(run_study):
  """Decorates study.run_study(study, workdir, ..., report_only=False): a training study holds the
  study directory's lock and reconciles its runs' failure marks first."""
  @functools.wraps(run_study)
  def wrapped(study, workdir: str, *args, report_only: bool = False, **kwargs):
    if report_only:
      return run_study(study, workdir, *args, report_only=True, **kwargs)
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lock.WorkdirLock(workdir)
    try:
      lock.acquire()
    except workdir_lock.LockedError as e:
      raise workdir_lock.LockedError(f"another study holds this study directory: {e}") from None
    try:
      reconcile(workdir)
      return run_study(study, workdir, *args, report_only=False, **kwargs)
    finally:
      lock.release()
  return wrapped


def reconcile(workdir: str) -> list[str]:
  """Moves aside the failure mark of every run under WORKDIR/runs that has in fact finished; returns
  the runs whose marks were moved."""
  moved = []
  for failed in sorted(glob.glob(os.path.join(workdir, "runs", "*", study_runs.FAILED))):
    run = os.path.dirname(failed)
    try:
      with open(os.path.join(run, "config.json")) as f:
        steps = json.load(f)["train"]["steps"]
      finished = study_runs.is_finished(run, steps)
    except (OSError, ValueError, KeyError, TypeError):
      continue  # no readable config: the mark stands
    if finished:
      os.replace(failed, os.path.join(run, SUPERSEDED))
      print(f"note: {os.path.basename(run)} finished, but a {study_runs.FAILED} beside it said it diverged; moved "
            f"that to {SUPERSEDED}", flush=True)
      moved.append(run)
  return moved


def checked_override(flag: str, field: str, current, value):
  """A --config.PATH=VALUE override of a study: a group is not a value, and a number must be in its
  range (validate.RANGES) before --plan or any run uses it. Returns value."""
  if hasattr(current, "keys"):
    raise ValueError(f"{flag} is a group of fields, not a value; set one of them: "
                     f"{', '.join(f'{flag}.{k}' for k in current.keys())}")
  why = validate.problem(field, value) if field in validate.RANGES else None
  if why:
    raise ValueError(f"{flag}: {why}")
  return value


def stop_if_interrupted(record: dict, name: str) -> None:
  """After train.train returned: a run stopped by Ctrl-C or SIGTERM (saved) stops the study."""
  if isinstance(record, dict) and record.get("preempted"):
    raise cli.Stopped(f"study stopped: {name} saved its step {record.get('step')} after the interrupt; rerun the "
                      "same command to resume (finished runs are skipped, this one resumes from its checkpoint)")

