"""One funnel for every command-line entry point (train, study, eval, sample, plot, summary, export_hf,
data.prepare): the same flag parsing (a mistyped flag gets a suggestion), the same translation of
storage errors, and one `error: ...` line for every failure instead of a traceback.

    if __name__ == "__main__":
      cli.run(main)                                              # argparse CLIs: main(argv)
      app.run(cli.funnel(main), flags_parser=cli.parse_flags)    # absl CLIs

Interrupts (Ctrl-C, SIGTERM). `python -m moa_jax.<cli>` installs `early_interrupts()` from the package's
__init__, before any other import: an interrupt while modules load exits at once with one line. The
funnel then installs the start-up handling: the first interrupt raises KeyboardInterrupt, which unwinds
every `finally` (the workdir lock released, the checkpoint manager closed) and ends in one line; a
second one exits at once. Training installs its own guard (runtime.PreemptionGuard: save, then stop)
when its loop starts. A process stopped by an interrupt, or whose failure leaves threads behind (Orbax's
writers after a failed save), leaves through os._exit once its `finally` blocks have run, so the
interpreter's shutdown can neither crash on nor wait forever for those threads.

This module imports nothing heavy (no jax): the package's __init__ imports it first.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import errno
import os
import re
import signal
import sys
import threading
import traceback
from typing import Callable

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
TRAIN_RERUN = ("rerun the same command: it resumes from the newest complete checkpoint (checkpoints and "
               "metrics already written are intact)")
RERUN = "rerun the same command (what was already written is intact)"
_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(Exception):
  """A command stopped on request (an interrupt) at a clean point; the message says how to go on."""

  def __init__(self, message: str, code: int = 130):
    super().__init__(message)
    self.code = code


# ------------------------------------------------------------------------------------------ errors

def storage_error(error: BaseException) -> OSError | None:
  """The disk-full / read-only / permission OSError behind `error` (Orbax wraps its writers' errors),
  or None."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
      return seen
    code = re.search(r"\[os_error_code='(\d+)'\]", str(seen))  # TensorStore's (Orbax's array writer) form
    if code and int(code.group(1)) in STORAGE_ERRNOS:
      path = re.search(r'Failed writing: "([^"]+)"', str(seen))
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else None)
    seen = seen.__cause__ or seen.__context__
  return None


def storage_message(error: OSError, workdir: str = "", then: str = TRAIN_RERUN) -> str:
  where = str(error.filename or workdir or "a file")
  inside = bool(workdir) and "://" not in workdir and os.path.abspath(where).startswith(os.path.abspath(workdir))
  place = ("another --workdir" if inside or not error.filename else
           "the setting that names this path (--config.data.cache_dir for the data cache, --cache_dir, --out)")
  fixes = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (quota)",
           errno.EROFS: f"point {place} at a writable directory"}
  fix = fixes.get(error.errno, f"make it writable, or point {place} at a writable directory")
  return f"error: cannot write {where}: {error.strerror}; {fix}, then {then}"


def _path_message(error: OSError) -> str:
  """A file or directory where the other is expected, a missing path, and other filesystem states."""
  where = error.filename or "a path"
  fixes = {errno.ENOENT: "check the path", errno.EISDIR: "it is a directory where a file is expected; move it "
           "aside", errno.ENOTDIR: "a part of it is a file where a directory is expected; move that file aside",
           errno.EEXIST: "it exists where a new one is made; move it aside"}
  fix = fixes.get(error.errno, "check the path")
  return f"error: {where}: {error.strerror or error}; {fix}"


def _ours(error: BaseException) -> bool:
  """Raised by moa_jax's own code (its messages name the value and the fix) rather than by a library."""
  if type(error).__module__.startswith("moa_jax"):
    return True
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and f"{os.sep}moa_jax{os.sep}" in frames[-1].filename


def message(error: BaseException, workdir: str = "", then: str = TRAIN_RERUN) -> str:
  """The one `error:` line for `error` (our own messages may list details on the lines below)."""
  full = storage_error(error)
  if full is not None:
    return storage_message(full, workdir, then)
  if isinstance(error, OSError) and error.errno is not None:
    return _path_message(error)
  text = str(error).strip() or type(error).__name__
  if _ours(error) and isinstance(error, (ValueError, RuntimeError, LookupError, OSError)):
    return f"error: {text}"
  frame = traceback.extract_tb(error.__traceback__)[-1:] or [None]
  where = f" (at {os.path.basename(frame[0].filename)}:{frame[0].lineno})" if frame[0] else ""
  return (f"error: {type(error).__name__}: {text.splitlines()[0][:300]}{where}; set MOA_JAX_TRACEBACK=1 to "
          "see the traceback")


# -------------------------------------------------------------------------------------- interrupts

_state = {"signal": None, "process": False}  # process: this process runs one CLI (python -m moa_jax.<cli>)


def _exit_now(code: int) -> None:
  """Leaves without the interpreter's shutdown (which waits for, or crashes on, library threads)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _early(signum, frame) -> None:
  del frame
  print(f"\nerror: interrupted ({_SIGNAL_NAMES[signum]}) while starting; nothing was written", file=sys.stderr)
  _exit_now(_EXIT_CODES[signum])


def early_interrupts() -> None:
  """While modules load: an interrupt exits at once with one line (nothing exists to clean up). Marks
  this process as one CLI's: only then may the funnel leave through os._exit (not inside a notebook
  or a test session that calls a main())."""
  _state["process"] = True
  for sig in _SIGNAL_NAMES:
    signal.signal(sig, _early)


def _startup(signum, frame) -> None:
  del frame
  if _state["signal"] is not None:  # a second interrupt while the first unwinds: abort now
    print(f"\nerror: {_SIGNAL_NAMES[signum]} again: aborted at once", file=sys.stderr)
    _exit_now(_EXIT_CODES[signum])
  _state["signal"] = signum
  raise KeyboardInterrupt


def _unraisable(unraisable) -> None:
  """A KeyboardInterrupt that Python had to drop (raised inside a gc callback) is not printed as a
  traceback: raise_if_interrupted raises it again; anything else goes to the default hook."""
  if not isinstance(unraisable.exc_value, KeyboardInterrupt):
    sys.__unraisablehook__(unraisable)


def install_interrupts() -> dict:
  """The first interrupt raises KeyboardInterrupt (every `finally` runs), a second one exits at once.
  Returns the handlers it replaced."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  _state["signal"] = None
  sys.unraisablehook = _unraisable
  return {sig: signal.signal(sig, _startup) for sig in _SIGNAL_NAMES}


def raise_if_interrupted() -> None:
  """Raises the KeyboardInterrupt of an interrupt already received whose raise was lost: Python drops an
  exception raised inside a gc callback or a __del__ ("Exception ignored in ..."), so a Ctrl-C landing there
  would be forgotten. Call it where a run stops being interruptible by a plain raise (before the loop's guard)."""
  if _state.get("signal") is not None:
    raise KeyboardInterrupt


def interrupted_name() -> str:
  return _SIGNAL_NAMES.get(_state["signal"], "Ctrl-C")


# ------------------------------------------------------------------------------------------- funnel

def funnel(main: Callable, *, workdir: Callable[[], str] = lambda: "", then: str = RERUN,
           interrupted: str = "stopped; " + RERUN) -> Callable:
  """`main` wrapped: interrupts handled from its first line, every failure one `error:` line (exit 1),
  an interrupt one line (exit 130; 143 for SIGTERM). workdir: the --workdir for storage messages;
  then: what to do after freeing space; interrupted: what an interrupt leaves and how to go on.
  The signal handlers in place before are put back when `main` returns."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    previous = install_interrupts()
    try:
      return main(*args, **kwargs)
    except SystemExit:
      raise
    except Stopped as e:
      _leave(e.code, str(e))
    except KeyboardInterrupt:
      _leave(_EXIT_CODES.get(_state["signal"], 130), f"error: interrupted ({interrupted_name()}): {interrupted}")
    except Exception as e:
      if os.environ.get("MOA_JAX_TRACEBACK"):
        raise
      line = message(e, _safe(workdir), then)
      if _threads_left():  # e.g. Orbax's writers after a failed save: the interpreter would wait forever
        _leave(1, line)
      raise SystemExit(line) from None
    finally:
      if not _state["process"]:  # a CLI process keeps _startup until it exits; a caller gets its own back
        _state["signal"] = None
        sys.unraisablehook = sys.__unraisablehook__
        for sig, handler in previous.items():
          signal.signal(sig, handler)
  return wrapped


def command(**kwargs) -> Callable:
  """`@cli.command(...)` on a CLI's main: funnel(main, **kwargs)."""
  return lambda main: funnel(main, **kwargs)


def _leave(code: int, line: str) -> None:
  """Prints `line`; a CLI process then exits at once (its `finally` blocks have run), a caller of main()
  in a longer-lived process gets SystemExit(code)."""
  print(line, file=sys.stderr)
  if _state["process"]:
    _exit_now(code)
  raise SystemExit(code)


def _threads_left() -> bool:
  main = threading.main_thread()
  return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())


def _safe(workdir: Callable[[], str]) -> str:
  try:
    return workdir() or ""
  except Exception:
    return ""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one `error:` line (and, for a mistyped flag, the nearest known one) instead of usage."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def parse_known_args(self, args=None, namespace=None):
    self._given = list(sys.argv[1:] if args is None else args)
    return super().parse_known_args(args, namespace)

  def error(self, text: str):
    known = [s for a in self._actions for s in a.option_strings]
    unknown = [a for a in getattr(self, "_given", []) if a.startswith("-") and a.split("=")[0] not in known]
    if unknown and (text.startswith("unrecognized arguments") or "required" in text):
      flag = unknown[0].split("=")[0]
      near = difflib.get_close_matches(flag, known, n=1)
      hint = f"; did you mean {near[0]}?" if near else f"; known flags: {', '.join(known)}"
      raise SystemExit(f"error: {self.prog}: unknown flag {flag}{hint}")
    raise SystemExit(f"error: {self.prog}: {text} (--help lists the flags)")


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False, what: str = "") -> None:
  """Raises ValueError naming the flag unless low ≤ value ≤ high (low < value with low_open)."""
  bad = value is not None and ((low is not None and (value <= low if low_open else value < low))
                               or (high is not None and value > high))
  if bad:
    bound = (f"> {low}" if low_open else f"≥ {low}") if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} = {value}; must be {bound}{f' ({what})' if what else ''}")


# ------------------------------------------------------------------------------------- absl flags

def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) with one-line errors for a mistyped `--config.x` field
  (with ml_collections' suggestion), a config file that is missing or fails to load, and a bad value."""
  from absl import flags
  config_arg = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
      config.keys()  # a file that failed to load raises on first use: make that happen here
      if not hasattr(config, "to_json_best_effort"):
        raise SystemExit(f"error: {config_arg}: get_config() returned a {type(config).__name__}, not an "
                         "ml_collections.ConfigDict; return one (configs/*.py are examples)")
    return rest
  except SystemExit:
    raise
  except flags.UnrecognizedFlagError as e:
    near = difflib.get_close_matches(e.flagname, list(flags.FLAGS), n=1)
    hint = f"; did you mean --{near[0]}?" if near else "; --help lists the flags"
    raise SystemExit(f"error: unknown flag --{e.flagname}{hint}") from None
  except flags.Error as e:
    raise SystemExit(f"error: {e}") from None
  except (AttributeError, KeyError) as e:  # an override names a field the config does not have
    text = str(e.args[0] if e.args else e)
    bad = re.match(r"""\W*(\w+)""", text)
    arg = next((a for a in argv[1:] if bad and re.search(rf"\.{bad.group(1)}(=|\.|$)", a)), None)
    hint = re.search(r'Did you mean "(\w+)"', text)
    if arg and hint:
      name = arg.split("=")[0]
      fix = name[:name.rindex(".") + 1] + hint.group(1)
      raise SystemExit(f"error: {name}: the config has no such field; did you mean {fix}?") from None
    raise SystemExit(f"error: {arg or 'a --config override'}: the config has no such field "
                     f"({text.splitlines()[0]}); the config file lists the fields") from None
  except OSError as e:
    path = config_arg.partition("=")[2].split(":")[0]
    if path and not os.path.exists(path):
      raise SystemExit(f"error: {config_arg}: no such file; the configs are in configs/ "
                       f"(e.g. --config=configs/debug.py)") from None
    raise SystemExit(f"error: {config_arg} could not be loaded: {str(e).strip().splitlines()[-1]}") from None
  except SyntaxError as e:  # the config file itself is not valid Python
    raise SystemExit(f"error: {config_arg} does not load: SyntaxError at line {e.lineno}: {e.msg}; "
                     "fix the file (configs/*.py are examples)") from None
  except Exception as e:  # get_config() (or the file's top level) raised: name it instead of a traceback
    raise SystemExit(f"error: {config_arg} does not load: {type(e).__name__}: {e}; "
                     "fix the file (configs/*.py are examples)") from None


class _DropBackgroundTracebacks:
  """A logging filter: drops the error records with tracebacks that Orbax logs (from its writer threads
  and from the main thread waiting on them) when a save fails, and those about a full or read-only disk;
  the command then stops with one `error:` line that names the same error."""

  def filter(self, record) -> bool:
    if record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      return False
    text = record.getMessage()
    return not any(s in text for s in ("No space left on device", "Read-only file system", "Disk quota exceeded",
                                       *(f"os_error_code='{n}'" for n in STORAGE_ERRNOS)))


def quiet_background_errors() -> None:
  """Installs the filter above, and turns what writer threads print through threading.excepthook or
  sys.excepthook into nothing ('Event loop is closed' after a failed Orbax save) or one warning line."""
  import logging as std_logging
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_DropBackgroundTracebacks())
  previous = sys.excepthook

  def hook(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      previous(kind, value, tb)
  sys.excepthook = hook

  def thread_hook(args):
    if not (args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed"):
      name = args.thread.name if args.thread else "a background thread"
      print(f"warning: {name} failed: {args.exc_type.__name__}: {args.exc_value}", file=sys.stderr)
  threading.excepthook = thread_hook
