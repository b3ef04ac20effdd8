"""The `lorakit` command line. Each subcommand lives in its own module and registers itself here."""

from .main import main

__all__ = ["main"]
