"""Checking the values of a state_dict before any of them is loaded."""
import numpy as np

from cyconv._checks import shape_text


def as_numpy(value):
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def check_state_value(where, key, value, target):
    """ValueError/TypeError unless value fits target: shape, dtype kind, finite in its dtype."""
    if value.shape != target.shape:
        raise ValueError(f"{where}: '{key}' expected shape {shape_text(target.shape)}, "
                         f"got {shape_text(value.shape)}")
    if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
        raise TypeError(f"{where}: '{key}' expected dtype {target.dtype}, got {value.dtype}")
    if target.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(target.dtype)
        if not np.all(np.isfinite(cast)):
            what = ("contains NaN or inf" if not np.all(np.isfinite(value)) else
                    f"has values beyond the range of {target.dtype} (they would become inf)")
            raise ValueError(f"{where}: '{key}' {what}")
    elif target.dtype.kind in "iu" and value.size and (
            value.min() < np.iinfo(target.dtype).min or value.max() > np.iinfo(target.dtype).max):
        raise ValueError(f"{where}: '{key}' has values beyond the range of {target.dtype}")
