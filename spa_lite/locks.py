"""Stage locks: one process writes a stage directory at a time.

``<stage>/LOCK`` names its holder (pid, host, command). A lock is held by one stage run
(``spa_lite.runs.stage_run``), which releases it when the stage ends, however it ends: no registry of held locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from spa_lite.errors import StageLockedError

__all__ = ["LOCK_NAME", "StageLock"]

LOCK_NAME = "LOCK"  # visible on purpose: `ls` shows a stage being written


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class StageLock:
    """The exclusive lock of one stage directory: ``<stage>/LOCK`` holds the holder's pid, host and command.

    The file is made with a hard link of a complete temporary file, so it exists only with its content and
    only one process can create it. A lock whose holder is on this host and no longer alive (a crash, kill -9)
    is stale and taken over; a lock held from another host cannot be checked and is refused. A lock that names
    this very process is taken as its own: in a container a restarted process often gets the pid of the one
    that was killed, and would otherwise be refused by its predecessor's lock.
    """

    def __init__(self, directory: str | os.PathLike, pid: int | None = None):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.pid = pid or os.getpid()
        self.host = socket.gethostname()

    def _holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> StageLockedError:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "an unreadable lock"
        since = f" since {holder['since']}" if holder.get("since") else ""
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        return StageLockedError(
            f"{self.dir} is in use by {who}{since}{cmd}: one process writes a stage at a time; wait for it to "
            f"finish, or if no such process is running delete {self.path}")

    def acquire(self) -> StageLock:
        """Take the lock. Raises StageLockedError when another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        info = {"pid": self.pid, "host": self.host, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".lock.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(info, f)
                try:
                    os.link(tmp, self.path)
                    return self
                except FileExistsError:
                    pass
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            holder = self._holder()
            if holder is None:  # released meanwhile
                continue
            mine = holder.get("host") == self.host and isinstance(holder.get("pid"), int)
            if mine and holder["pid"] == self.pid:
                return self
            if not (mine and not _pid_alive(holder["pid"])):
                raise self._refuse(holder)
            # stale: move it aside, and delete it only if it is still the dead holder's (not a new one)
            aside = self.dir / f".lock.stale.{self.pid}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, aside)
                if json.loads(aside.read_text(encoding="utf-8")).get("pid") != holder["pid"]:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path)
                aside.unlink()
        raise self._refuse(self._holder() or {})

    def release(self) -> None:
        """Delete the lock file if it is still this holder's."""
        holder = self._holder()
        if holder and holder.get("pid") == self.pid and holder.get("host") == self.host:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> StageLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

