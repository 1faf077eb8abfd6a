"""Argument checking, done in Python before any kernel runs.

Every message says what was expected and what came, e.g.
``Conv2d: expected input of shape (N, 3, H, W), got (8, 4, 32, 32)``.
"""
import math

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(dtype):
    """np.dtype(dtype) if it is float32 or float64 (None: float32, the default), else TypeError."""
    if dtype is None:
        return np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    # (dt is None when np.dtype failed; `None in FLOAT_DTYPES` is True: dtype('float64') == None)
    if dt is None or dt not in FLOAT_DTYPES:
        raise TypeError(f"expected dtype float32 or float64, got {dtype!r}")
    return dt


def positive_pair(name, value, minimum=1):
    """An int or a pair of ints, each >= minimum, as a tuple (h, w)."""
    try:
        pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    except TypeError:  # not iterable: a float, None, ...
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 and v >= minimum for v in pair):
        raise ValueError(f"expected {name} to be an int >= {minimum} or a pair of them, "
                         f"got {value!r}")
    return int(pair[0]), int(pair[1])


def positive_int(name, value):
    """value itself if it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    return int(value)


def number_in(where, name, value, low, high, none_ok=False):
    """float(value) when it is a finite real number in [low, high] (None too when none_ok)."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, str, np.bool_)) or \
            not isinstance(value, (int, float, np.integer, np.floating)) or \
            not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{where}: expected {name} to be a finite number in [{low}, {high}]"
                         f"{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


INT_MAX = 2**31 - 1  # the kernels index with C int


def fits_int32(where, sizes):
    """ValueError unless every size ({description: value}) fits the kernels' 32-bit ints."""
    for name, size in sizes.items():
        if size > INT_MAX:
            raise ValueError(f"{where}: expected {name} <= {INT_MAX} (the kernels' 32-bit "
                             f"indices), got {size}")


def shape_text(shape):
    """(N, 3, H, W) style text of a shape whose entries may be names or ints."""
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def as_float_array(layer, x):
    """x as a C-contiguous float32/float64 array of any shape, or a clear error."""
    where = type(layer).__name__
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{where}: expected a numpy ndarray input, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: expected a float32 or float64 input, got {x.dtype}")
    x = np.asarray(x)  # a plain ndarray (not np.matrix, whose reshape(-1) stays 2-D)
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def as_input(layer, x, expected_shape, dtype=None):
    """x as a C-contiguous float array of the expected shape, or a clear error.

    expected_shape holds ints (must match) and names (any size), e.g.
    ("N", 3, "H", "W").  dtype: the layer's dtype, or None for float32/float64.
    """
    where = type(layer).__name__
    if dtype is not None and isinstance(x, np.ndarray) and x.dtype != dtype:
        raise TypeError(f"{where}: expected a {np.dtype(dtype).name} input "
                        f"(the layer's dtype), got {x.dtype}")
    x = as_float_array(layer, x)
    check_shape(layer, x.shape, expected_shape)
    return x


def check_shape(layer, shape, expected_shape):
    """ValueError unless ``shape`` fits ``expected_shape`` (see :func:`as_input`)."""
    where = type(layer).__name__
    shape = tuple(shape)
    if len(shape) != len(expected_shape):
        raise ValueError(f"{where}: expected {len(expected_shape)}-D input of shape "
                         f"{shape_text(expected_shape)}, got {len(shape)}-D {shape_text(shape)}")
    if any(isinstance(e, int) and e != s for e, s in zip(expected_shape, shape)):
        raise ValueError(f"{where}: expected input of shape {shape_text(expected_shape)}, "
                         f"got {shape_text(shape)}")
    if 0 in shape[1:]:
        raise ValueError(f"{where}: expected non-empty dimensions, got shape {shape_text(shape)}")
    return shape


def as_grad_output(layer, grad_output, expected_shape, dtype):
    """grad_output as a C-contiguous array of the forward output's shape and dtype."""
    where = type(layer).__name__
    if not isinstance(grad_output, np.ndarray):
        raise TypeError(f"{where}.backward: expected a numpy ndarray gradient, "
                        f"got {type(grad_output).__name__}")
    if grad_output.shape != tuple(expected_shape):
        raise ValueError(f"{where}.backward: expected a gradient of shape "
                         f"{shape_text(expected_shape)} (the output's), "
                         f"got {shape_text(grad_output.shape)}")
    if grad_output.dtype != dtype:
        raise TypeError(f"{where}.backward: expected a {np.dtype(dtype).name} gradient, "
                        f"got {grad_output.dtype}")
    grad_output = np.asarray(grad_output)  # (ascontiguousarray would make a 0-d array 1-d)
    return grad_output if grad_output.flags.c_contiguous else np.ascontiguousarray(grad_output)
