"""Coercion of option values, which arrive as Python values or as ``--modality-option`` strings."""

from __future__ import annotations

from typing import Any

import numpy as np

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a boolean: a bool, 0/1, or one of true/false/yes/no/on/off (any case)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an integer of at least ``minimum`` (integers or their decimal strings)."""
    if not isinstance(value, bool) and isinstance(value, (int, np.integer, str)):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is not None and number >= minimum:
            return number
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
