"""Sameness of JSON values down to their types, for tests that hold a faster encoder to the old one.

``==`` is not enough there: ``1 == 1.0 == True`` and ``0.0 == -0.0``, and two
dicts are equal whatever their keys' order, yet each of these writes other text.
"""

from __future__ import annotations

import math
from typing import Any


def same_json(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down, dict keys in the same order, floats with the same sign."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b
