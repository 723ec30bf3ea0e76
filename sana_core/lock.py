"""An exclusive lock on an output folder, so that two jobs never write into the same run.

    with OutputLock(output_dir, what="training run"):
        ...   # a second job on the same folder fails with one line naming this one's host and pid

How it works: the lock is a small JSON file (`<folder>/.sana.lock`) created with O_CREAT | O_EXCL, which is
atomic on local filesystems and on the shared ones clusters use (NFSv3+, Lustre, GPFS, CephFS). It records the
holder's host, pid, pid namespace, boot id and process start time. A job that finds the file:
- refuses to start (SanaError, one line with the holder's host, pid and start time) when the holder may be alive;
- takes the lock over when the holder is provably dead: same host and same pid namespace, and the pid is gone,
  belongs to a newer process (pid reuse, told by its start time), or the machine has rebooted since (boot id).
  Takeovers are serialised by an fcntl lock on a side file, so two jobs never both take over one stale lock.

Limits (why no lock can do better without a lock server):
- A lock left by a job that died on ANOTHER host cannot be told from a live one (its pid cannot be checked from
  here), so it is never taken over: the error says which host held it and to delete the lock file once that job
  is known to be gone.
- Processes in different containers that share a hostname but not a pid namespace see each other's locks as
  alive (never as stale), for the same reason.
- Object-store mounts (s3fs, gcsfuse, blobfuse) do not give atomic exclusive creation; the lock is best-effort
  there. NFSv2 does not either.
- The lock is advisory: it keeps out jobs that take it (training and curation), not other programs.
- The file is not a lease: a job that hangs forever keeps its lock; only its death releases it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from sana_core.errors import SanaError
from sana_core.secrets import redact_argv

LOCK_NAME = ".sana.lock"
# An unparsable lock file younger than this may be one another job is writing right now; older is debris.
_UNREADABLE_GRACE_S = 30.0


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None off Linux."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _me(token: str, what: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_ns(),
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "start": _proc_start(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what,
            "command": " ".join(redact_argv(sys.argv))[:300], "token": token}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def holder_is_dead(holder: dict) -> bool:
    """True only when the lock's holder is provably gone (see the module docstring for when that can be told)."""
    if holder.get("host") != socket.gethostname() or holder.get("pid_ns") != _pid_ns():
        return False
    boot_id = _read_text("/proc/sys/kernel/random/boot_id")
    if holder.get("boot_id") and boot_id and holder["boot_id"] != boot_id:
        return True  # rebooted since: nothing from before is running
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid() and holder.get("start") == _proc_start(pid):
        return False  # this very process (an OutputLock taken twice): not stale, a programming error upstream
    if not _pid_alive(pid):
        return True
    start = holder.get("start")
    return start is not None and _proc_start(pid) not in (None, start)  # pid reused by a newer process


def describe(holder: dict) -> str:
    what = holder.get("what") or "job"
    return f"{what} on host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {holder.get('since', '?')})"


class OutputLock:
    """Exclusive lock on `folder` (created if missing); a context manager, or call acquire() / release()."""

    def __init__(self, folder: str | os.PathLike, what: str = "job", name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.token = uuid.uuid4().hex
        self.held = False
        self.took_over: dict | None = None  # the dead holder this lock replaced, if any

    def read_holder(self) -> dict | None:
        """The current holder's record; None when there is no lock file or it cannot be parsed."""
        text = _read_text(str(self.path))
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> OutputLock:
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(self.token, self.what), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise SanaError(f"could not take the lock {self.path}: other jobs keep taking and releasing it")

    def _handle_existing(self) -> None:
        """Return to retry the creation (the file is gone or was stale and removed); raise if it is held."""
        holder = self.read_holder()
        if holder is None:
            holder = self._wait_readable()
        if holder is None:
            self._remove_if_unchanged(None)  # debris: an empty or garbled file older than the grace period
            return
        if not holder_is_dead(holder):
            raise SanaError(f"{self.folder} is in use by another {describe(holder)}; if that job is gone, "
                            f"delete {self.path}")
        if self._remove_if_unchanged(holder.get("token")):
            self.took_over = holder

    def _wait_readable(self) -> dict | None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if not self.path.exists():
                return None
            holder = self.read_holder()
            if holder is not None:
                return holder
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age < _UNREADABLE_GRACE_S:
            raise SanaError(f"{self.folder} has a lock file being written or damaged ({self.path}); "
                            f"retry in {_UNREADABLE_GRACE_S:.0f} s, or delete it if no job is running")
        return None

    def _remove_if_unchanged(self, token: str | None) -> bool:
        """Delete the lock file if it still holds `token` (None: still unparsable), under the takeover lock."""
        side = str(self.path) + ".takeover"
        with open(side, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                current = self.read_holder()
                if not self.path.exists():
                    return False
                if (current.get("token") if current else None) != token:
                    return False  # someone else took it over first
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    return False
                return True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.read_holder()
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
