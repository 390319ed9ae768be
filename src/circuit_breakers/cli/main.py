"""`circuit-breakers` command line: the command table, error mapping to exit codes and logging setup.

Each command group lives in its own module (parse, call the library, print); `launch` relaunches
`train` under `accelerate launch`.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from ..locks import FolderLocked
from .agents import agents_command
from .categories import categories_command
from .console import console
from .data import data_command
from .env import env_command
from .evaluate import eval_command
from .guard import probe_command, serve_command
from .redteam import redteam_command
from .run import run_command, sweep_command
from .train import interpolate_command, merge_command, train_command

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, yaml.YAMLError, FolderLocked)
"""Errors a user can mend: a bad value (ValueError: our DataError, ModelError, ConfigError, JSON decode errors),
a file that is missing, unreadable, a folder, or on a full disk (OSError), bad YAML, a folder another process
holds. Each is one line on stderr (`error_line`) and exit code 2, no traceback."""

_OS_ERRORS = {
    errno.EACCES: "permission denied: {path}; check the file's or folder's permissions",
    errno.EPERM: "permission denied: {path}; check the file's or folder's permissions",
    errno.ENOSPC: "no space left on device: {path}; free some space and run the command again",
    errno.EDQUOT: "disk quota exceeded: {path}; free some space and run the command again",
    errno.EROFS: "read-only file system: {path}; choose a folder you can write to",
    errno.EISDIR: "{path} is a folder, not a file; give a file",
    errno.ENOTDIR: "{path}: a part of it is a file, not a folder; choose another path",
    errno.EEXIST: "{path} already exists; choose another path",
    errno.ENOENT: "{path} does not exist",
    errno.ENAMETOOLONG: "file name too long: {path}",
}


def error_line(err: BaseException) -> str:
    """The one line a user sees for a user error: our own messages as written, OS errors as what is wrong with
    which path and what to do, JSON and YAML errors with their line; never more than one line."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # raised by the OS, not by us
        path = str(err.filename)
        if err.errno in (errno.EEXIST, errno.ENOTDIR) and Path(path).is_file():
            text = f"{path} is a file, not a folder; choose another path"
        else:
            text = _OS_ERRORS.get(err.errno, "{path}: " + err.strerror).format(path=path)
    elif isinstance(err, json.JSONDecodeError):  # raised without the file's name: say at least what and where
        text = f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    elif isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])  # str(KeyError) would quote it
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, never wrapped: scripts grep it


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command,
    "sweep": sweep_command,
    "train": train_command,
    "merge": merge_command,
    "interpolate": interpolate_command,
    "data": data_command,
    "eval": eval_command,
    "redteam": redteam_command,
    "env": env_command,
    "agents": agents_command,
    "categories": categories_command,
    "probe": probe_command,
    "serve": serve_command,
}


def configure_logging() -> None:
    """INFO from our logger on the main process; under `accelerate launch` other ranks log warnings and
    errors only, so a multi-process run prints each message once."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("circuit_breakers").setLevel(logging.INFO if main_process else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `circuit-breakers` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<12} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: circuit-breakers COMMAND [options]\n\ncommands:\n{lines}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    configure_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
