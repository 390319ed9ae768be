"""`circuit-breakers` command line: the command table, error mapping to exit codes and logging setup.

Each command group lives in its own module (parse, call the library, print); `launch` relaunches
`train` under `accelerate launch`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .agents import agents_command
from .categories import categories_command
from .console import console
from .data import data_command
from .env import env_command
from .evaluate import eval_command
from .guard import probe_command, serve_command
from .run import run_command, sweep_command
from .train import interpolate_command, merge_command, train_command

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)
"""Errors a user can mend (a bad value, a missing file): one line on stderr and exit code 2, no traceback."""


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command,
    "sweep": sweep_command,
    "train": train_command,
    "merge": merge_command,
    "interpolate": interpolate_command,
    "data": data_command,
    "eval": eval_command,
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
        print(f"error: {err}", file=sys.stderr)  # one line, never wrapped: scripts grep it
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
