"""`python -m zkeb` runs the CLI."""

from __future__ import annotations

from zkeb.cli import main

main()
