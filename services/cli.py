"""The `adaptive-kv serve` subcommand (placeholder flags until the service lands)."""

from __future__ import annotations

import argparse


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register `serve` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a model with its KV policy behind an OpenAI-compatible HTTP API")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("serve is not implemented yet")))
