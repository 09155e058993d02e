"""Checks of the numbers users pass (counts, seeds, weights): the type and range, with messages saying what to do.

Whole numbers must be ints: Python ``int``, NumPy integers or one-element integer torch tensors. Floats are
refused even when integral (``2.0``), as are bools and strings, so a typo never turns into a silent
truncation. Real numbers may be ints or floats (not bools or strings) and must be finite.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from .errors import JanusError


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def whole_number(name: str, value: object, minimum: int | None = None, maximum: int | None = None,
                 hint: str = "") -> int:
    """``value`` as an ``int`` within ``minimum..maximum`` (either may be None); ``hint`` ends range errors."""
    try:
        if _is_bool(value):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise JanusError(f"{name} must be a whole number (int), got {value!r} ({type(value).__name__}).") from None
    if minimum is not None and number < minimum:
        raise JanusError(f"{name} must be >= {minimum}{hint}, got {number}.")
    if maximum is not None and number > maximum:
        raise JanusError(f"{name} must be <= {maximum}{hint}, got {number}.")
    return number


def finite_number(name: str, value: object) -> float:
    """``value`` as a finite ``float``; refuses NaN, infinities, bools and strings."""
    try:
        if _is_bool(value) or isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise JanusError(f"{name} must be a number, got {value!r} ({type(value).__name__}).") from None
    if not math.isfinite(number):
        raise JanusError(f"{name} must be a finite number, got {number}.")
    return number
