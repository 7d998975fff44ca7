"""Moved to :mod:`tlbptt.cli` (outside the package, so ``tlbptt --help`` does not load Lightning); kept for 0.1
callers."""

from tlbptt.cli import COMMANDS, costs_main, main

__all__ = ["COMMANDS", "costs_main", "main"]
