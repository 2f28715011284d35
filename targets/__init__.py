"""Targets: one module per deployment target, each exposing SUPPORTS and build().

Installed as compress.targets. A target's heavy SDK is imported inside build().
"""

import importlib

KNOWN = ("cpu",)


def get(name: str):
    """The module of a target, imported only when used."""
    from compress.errors import TargetError

    if name not in KNOWN:
        raise TargetError(f"unknown target '{name}' (known: {', '.join(KNOWN)})")
    return importlib.import_module(f"compress.targets.{name}")
