"""The preprocessing a model carries: class names, mean/std, image size, channel order,
interpolation and centre crop, each checked for type and range and against the model
when a checkpoint (or an exporter) hands them over."""
import math

import numpy as np

MAX_IMAGE_SIDE = 8192
FIELDS = ("classes", "mean", "std", "image_size", "channel_order", "interpolation",
          "center_crop")


class PreprocessingError(ValueError):
    """A preprocessing field of a wrong type or range (says which)."""


def checked_preprocessing(path, meta, model):
    """{classes, mean, std, image_size, channel_order, interpolation, center_crop} of the
    metadata, each checked for type and range and against the model (PreprocessingError
    naming the field).  ``center_crop``: the share of each side of a photo kept, around
    its centre, before it is resized to ``image_size`` (default 1: the whole photo)."""
    def bad(field, expected):
        return PreprocessingError(f"{path}: metadata field {field!r} must be {expected}, "
                               f"got {meta.get(field)!r:.80}")

    out = {}
    for field in ("mean", "std"):
        value = meta.get(field)
        if value is not None and not (isinstance(value, list) and len(value) == 3 and all(
                _is_number(v) and math.isfinite(v) for v in value)):
            raise bad(field, "3 finite numbers")
        if field == "std" and value is not None and min(value) <= 0:
            raise bad(field, "3 numbers > 0")
        out[field] = None if value is None else np.asarray(value, np.float32)
    size = meta.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE
            for v in size)):
        raise bad("image_size", f"[H, W], whole numbers from 1 to {MAX_IMAGE_SIDE}")
    out["image_size"] = None if size is None else tuple(size)
    order = meta.get("channel_order")
    if order not in (None, "RGB", "BGR"):
        raise bad("channel_order", '"RGB" or "BGR"')
    out["channel_order"] = order or "RGB"
    interpolation = meta.get("interpolation")
    if interpolation not in (None, "area", "linear"):
        raise bad("interpolation", '"area" or "linear"')
    out["interpolation"] = interpolation or "area"
    crop = meta.get("center_crop")
    if crop is not None and not (_is_number(crop) and 0 < crop <= 1):
        raise bad("center_crop", "a number in (0, 1]")
    out["center_crop"] = 1.0 if crop is None else float(crop)
    out["classes"] = _checked_classes(path, meta.get("classes"), model, out["image_size"])
    return out


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_classes(path, classes, model, image_size):
    if classes is None:
        return None
    if not (isinstance(classes, list) and classes and all(
            isinstance(c, str) and c for c in classes) and len(set(classes)) == len(classes)):
        raise PreprocessingError(f"{path}: metadata field 'classes' must be a list of distinct, "
                              f"non-empty names, got {classes!r:.80}")
    if image_size is not None:
        try:
            outputs = model.output_shape((1, 3) + image_size)
        except (ValueError, NotImplementedError) as error:
            raise PreprocessingError(f"{path}: the model does not take the stored image size "
                                  f"{list(image_size)}: {error}") from None
        if outputs != (1, len(classes)):
            raise PreprocessingError(f"{path}: {len(classes)} class names but the model gives "
                                  f"outputs of shape {list(outputs)[1:]}")
    return list(classes)
