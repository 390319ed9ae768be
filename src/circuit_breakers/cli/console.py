"""The command line's console: messages, paths and tables on stderr (rich), so stdout carries only what
scripts read."""

from rich.console import Console

console = Console(stderr=True)
