"""The `circuit-breakers` command line: it parses, calls the library and prints."""

from .main import main

__all__ = ["main"]
