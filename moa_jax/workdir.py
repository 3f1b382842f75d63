"""One run per work directory: a lock file `WORKDIR/lock` naming its holder (pid, host, start time).

Local directories: the lock is an `fcntl.flock` on that file, which the kernel drops when the holder
dies however it dies, so a lock left by a killed run is simply taken over (with a note naming the dead
holder). Filesystems without flock, and object stores (gs://), fall back to the file's contents: a lock
whose holder ran on this host under a pid that no longer exists is stale and taken over; any other is
refused. On object stores this is best effort (no atomic create): two runs started within the same
second can both pass.

Released on exit, including SIGTERM/Ctrl-C; a second run on a held directory stops with one line
naming the holder.

Why not the `filelock` package: its FileLock is the same flock, and its SoftFileLock (4.x) judges a
holder stale by pid and host, but both open paths with os.open, so neither reaches a gs:// work
directory, and FileLock keeps no holder to name. Using it would mean this module's object-store path
beside a second mechanism for local disks, for no behaviour gained.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = "lock"


class LockedError(RuntimeError):
  """The work directory is held by another live run."""


def _me() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}


def _parse(text: str) -> dict | None:
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) and "pid" in holder else None
  except ValueError:
    return None


def _alive_here(holder: dict) -> bool:
  """Whether `holder` may still be running: always True for another host (we cannot look)."""
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


def describe(holder: dict) -> str:
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')})"


def _refusal(path: str, holder: dict | None) -> LockedError:
  who = describe(holder) if holder else "another process"
  return LockedError(f"{os.path.dirname(path) or path} is in use by {who}; wait for that run to finish, stop it, "
                     f"or use another --workdir (if it is surely gone, delete {path})")


class WorkdirLock:
  """`with WorkdirLock(workdir, note=print):` holds the lock for the block. `note` gets one line when a
  stale lock is taken over."""

  def __init__(self, workdir: str, note=print):
    self.remote = "://" in workdir
    self.path = workdir.rstrip("/") + "/" + LOCK_NAME if self.remote else os.path.join(workdir, LOCK_NAME)
    self._note = note
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    if self.remote:
      return self._acquire_remote()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
      os.close(fd)
      raise _refusal(self.path, holder) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      os.close(fd)  # no flock here (some network filesystems): judge by the file's contents
      return self._acquire_remote()
    previous = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous and previous.get("pid") != os.getpid():
      self._note(f"note: took over the lock of {describe(previous)}, which is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _acquire_remote(self) -> None:
    from etils import epath
    path = epath.Path(self.path)
    holder = _parse(path.read_text()) if path.exists() else None
    if holder and holder.get("pid") != os.getpid():
      if _alive_here(holder):
        raise _refusal(self.path, holder)
      self._note(f"note: took over the lock of {describe(holder)}, which is no longer running")
    path.write_text(json.dumps(_me()))
    self._fd = -1

  def release(self) -> None:
    if self._fd is None:
      return
    if self._fd >= 0:  # empty the file rather than delete it: a waiting opener keeps the same inode
      os.ftruncate(self._fd, 0)
      os.close(self._fd)
    else:
      from etils import epath
      epath.Path(self.path).unlink(missing_ok=True)
    self._fd = None
