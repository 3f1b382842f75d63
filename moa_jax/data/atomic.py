"""Files of a prepared set are written under a temporary name and renamed into place, so a reader
never sees a partial file; the temporaries a killed run leaves behind are removed by the next run.

A temporary is `<final name>.tmp-<host>-<pid>-<random>`. It is stale when the process writing it is
gone: on this host, when no process has that pid; from another host (a shared gs:// cache), when
it is older than STALE_AFTER_S. Paths go through etils.epath: local directories and gs:// alike.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from etils import epath

STALE_AFTER_S = 24 * 3600
_MARK = ".tmp-"


def tmp_path(path: str | os.PathLike) -> epath.Path:
  path = epath.Path(path)
  return path.with_name(f"{path.name}{_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  tmp = tmp_path(path)
  tmp.write_bytes(data)
  tmp.replace(path)


def remove_stale(directory: str | os.PathLike) -> list[str]:
  """Deletes the stale temporaries in `directory`; returns their names."""
  removed = []
  for path in epath.Path(directory).glob(f"*{_MARK}*"):
    if _stale(path):
      path.unlink(missing_ok=True)
      removed.append(path.name)
  return removed


def _host() -> str:
  return socket.gethostname().replace("-", "_")  # '-' separates the fields of the name


def _stale(path: epath.Path) -> bool:
  owner = path.name.rpartition(_MARK)[2].split("-")
  if len(owner) == 3 and owner[0] == _host() and owner[1].isdigit():
    return not _alive(int(owner[1]))
  try:
    return time.time() - path.stat().mtime > STALE_AFTER_S
  except FileNotFoundError:  # its writer renamed it meanwhile
    return False


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True
