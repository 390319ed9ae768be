"""One writer per folder: an exclusive lock on an output or run folder, held for the whole job.

Two processes writing one folder (two `train` runs on one output_dir, two `run` on one run folder) mix
their files and report results that the folder does not hold. `folder_lock` takes an OS advisory lock
(`filelock`, which uses flock on POSIX) on a file inside the folder and refuses a second process at once,
naming the holder (pid, host, command, start time) that it wrote into the lock file. An advisory lock dies
with its process, so a run killed by SIGKILL leaves nothing that blocks the next one; the lock file itself
stays (it is how waiters share one lock) and is ignored by the checks for occupied folders. A folder the
lock made and the job left empty (it failed before writing) is removed again, lock file included, while
the lock is still held: a process that opened the old lock file then finds the folder gone when it writes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FILE = ".circuit-breakers.lock"
"""The lock file's name inside a locked folder (hidden; never counted as one of the folder's files)."""

MAX_COMMAND = 200


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock: it is training, running or exporting into it now."""


def holder_details() -> dict[str, object]:
    """What a refused process is told about this one: pid, host, command line and start time."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else []
    command = " ".join(" ".join(argv).split())  # one line, whatever the arguments held
    if len(command) > MAX_COMMAND:
        command = command[: MAX_COMMAND - 3] + "..."
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe_holder(lock_file: str | Path) -> str:
    """The holder named in `lock_file`, as one phrase (it may not have written its details yet)."""
    try:
        holder = json.loads(Path(lock_file).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}, running `{holder['command']}`"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold `folder`'s exclusive lock for the block (the folder is made if missing). Raises FolderLocked at
    once, naming the holder, when another process (or another block of this one) holds it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{what} {folder} is a file, not a folder; choose another folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLocked(
            f"{what} {folder} is in use by another process ({describe_holder(path)}); wait for it to finish, "
            "or choose another folder"
        ) from None
    try:
        path.write_text(json.dumps(holder_details()), encoding="utf-8")
        yield folder
    finally:
        try:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()  # a folder this block made and nothing filled (the job failed): leave no trace
                folder.rmdir()
            else:  # an empty lock file: nobody holds it (not made again if the folder was replaced meanwhile)
                os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        except OSError:
            pass
        lock.release()
