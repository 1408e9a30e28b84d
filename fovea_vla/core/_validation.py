"""Type checks shared by the core configs' ``__post_init__`` validation."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["is_int", "is_real"]


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool.

    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number (Python or NumPy, integers included), not a bool.

    >>> is_real(0.5), is_real(np.float32(1)), is_real(2), is_real(False)
    (True, True, True, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
