"""One run at a time per run folder: a lock file holding its owner's pid and host.

The exclusion itself is an ``flock`` on the file, which the kernel drops when its owner dies, so
a lock left by a killed run is never mistaken for a live one: it is taken over with a warning
naming the dead owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_FILE = "run.lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir``'s lock (creating the folder) for the ``with`` block; raises
    :class:`RunFolderBusy` naming the owner if another process holds it. A folder this call
    created is removed again if the block leaves it empty (a refused run leaves no trace)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(f"run folder {run_dir} is in use by {_owner(path)} (lock file "
                                f"{path}); wait for it to end or choose another name=") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # not unlinked by the previous owner between our open and flock
        os.close(fd)
    try:
        previous = os.read(fd, 4096).decode(errors="replace")
        if previous.strip():
            warnings.warn(f"run folder {run_dir}: taking over the lock of "
                          f"{_describe(previous)}, which is no longer running", RuntimeWarning,
                          stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty


def _owner(path: Path) -> str:
    try:
        return _describe(path.read_text())
    except OSError:
        return "another process"


def _describe(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
