"""One process per workdir: `<workdir>/sdejax.lock` names the process that holds it.

The holder keeps an exclusive `flock` on the file for as long as it holds the lock (the kernel drops
it if the process dies) and writes its identity into it: host, pid, the pid's start time (to tell a
reused pid apart) and the command. A second process asking for a held lock fails at once with
`WorkdirLockedError` naming the holder. On release the file is emptied (never deleted, so no
process can lock a file that another has just unlinked). A non-empty file whose pid no longer runs
on this host is the lock of a killed run: it is taken over with a warning. A lock written on another
host is never taken over (its process may be alive); the error says how to remove it.

Training holds its workdir's lock for the whole run (`exclusive`); other modes take it only for a
moment, to tidy the checkpoint folder (`exclusive_access`), and skip tidying when a run holds it.
In a multi-process run, process 0 takes the lock for all processes.

The set of workdirs this process holds is process state by nature (a flock belongs to a process);
it lives in `_HELD`.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

LOCK_FILE = "sdejax.lock"
_HELD: dict[pathlib.Path, WorkdirLock] = {}
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class WorkdirLockedError(RuntimeError):
    """Another process holds the workdir's lock."""


def _proc_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _alive(holder: dict) -> bool:
    """Whether the holder's process (on this host) still runs: its pid exists with the same start time."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    recorded, now = holder.get("pid_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now


def describe(holder: dict) -> str:
    """'pid 123 on host h (started 2024-05-01T10:00:00+00:00: python -m sdejax.cli ...)'."""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")


def _read(fd: int) -> Optional[dict]:
    """The holder recorded in the lock file; None if empty; {'unreadable': text} if not valid JSON."""
    text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}
    return holder if isinstance(holder, dict) else {"unreadable": text[:200]}


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)


def _holder_record(fd: int, wait_s: float = 5.0) -> Optional[dict]:
    """The holder's record; a holder that has just taken the flock writes it a moment later, so an
    empty record is re-read for up to `wait_s` before the holder is called "starting"."""
    deadline = time.monotonic() + wait_s
    while not (holder := _read(fd)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


class WorkdirLock:
    """The lock of `workdir` (acquire/release, or a context manager)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning; WorkdirLockedError if it is held."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._flock(fd)
            self._check_free(_read(fd))
        except BaseException:
            os.close(fd)
            raise
        _write(fd, json.dumps(_identity()) + "\n")
        self._fd = fd
        _HELD[self.workdir] = self

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_record(fd)
            raise WorkdirLockedError(self._held_message(describe(holder) if holder else "a process that is "
                                                        "starting")) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            logging.warning("the filesystem of %s does not support flock; the workdir lock relies on the pid "
                            "recorded in %s only", self.workdir, self.path)

    def _check_free(self, holder: Optional[dict]) -> None:
        """Raise unless the recorded holder (if any) is a dead process on this host."""
        if holder is None:
            return
        if "unreadable" not in holder and holder.get("host") != socket.gethostname():
            raise WorkdirLockedError(self._held_message(describe(holder)) + " If that run is no longer alive "
                                     f"on {holder.get('host')}, delete {self.path} and start again.")
        if "unreadable" not in holder and _alive(holder):
            raise WorkdirLockedError(self._held_message(describe(holder)))
        logging.warning("taking over the lock %s: its holder %s is no longer running (killed?)", self.path,
                        describe(holder) if "unreadable" not in holder else repr(holder["unreadable"]))

    def _held_message(self, holder: str) -> str:
        return (f"workdir {self.workdir} is in use by {holder} (lock file {self.path}). One run per workdir: "
                "wait for it to finish, stop it, or use another --workdir.")

    def release(self) -> None:
        """Empty the lock file and drop the flock."""
        if self._fd is None:
            return
        _HELD.pop(self.workdir, None)
        try:
            _write(self._fd, "")
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        """Acquire on process 0; every process raises if process 0 could not."""
        error = None
        if jax.process_index() == 0:
            try:
                self.acquire()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1 and not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
            error = error or WorkdirLockedError(f"process 0 could not lock {self.workdir} (see its error)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds(path: str | os.PathLike) -> bool:
    """Whether this process holds the lock of `path` or of a folder above it."""
    path = pathlib.Path(path).absolute()
    return any(path == w or w in path.parents for w in _HELD)


@contextlib.contextmanager
def exclusive_access(workdir: str | os.PathLike) -> Iterator[bool]:
    """True while this process holds `workdir`'s lock (already, or taken for the duration); False,
    without waiting, when another live process holds it."""
    if holds(workdir):
        yield True
        return
    lock = WorkdirLock(workdir)
    try:
        lock.acquire()
    except WorkdirLockedError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def exclusive(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(config, workdir, ...)` run while holding `workdir`'s lock (one training run per workdir)."""

    @functools.wraps(fn)
    def locked(config: Any, workdir: str | os.PathLike, *args, **kwargs):
        with WorkdirLock(workdir):
            return fn(config, workdir, *args, **kwargs)

    return locked
