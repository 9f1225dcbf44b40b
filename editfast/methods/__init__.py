"""Editing methods, one file each, found through one registry.

Every module in this package that defines ``METHOD`` (an instance of ``base.Method``) is a
method; the CLI's choices, the API, template generation and hyper-parameter loading all read
``METHODS``. Nothing outside this package names a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import EditfastError
from .base import LocateThenEdit, Method, State


def _discover() -> dict[str, Method]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        m = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(m, Method):
            found[m.name] = m
    return found


METHODS: dict[str, Method] = _discover()


def get_method(name: str) -> Method:
    key = str(name).lower()
    if key not in METHODS:
        raise EditfastError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["METHODS", "Method", "LocateThenEdit", "State", "get_method"]
