"""Import of the reference C++ project's trained ``.model`` files.

The network is :func:`cyconv.models.reference`: Conv 3->16 k3 s2, ReLU, MaxPool 2,
Conv 16->32 k3 s2, ReLU, Conv 32->64 k3 s2, ReLU, Conv 64->128 k3 s2, ReLU,
Linear 4608 -> classes (for 224x224 images).

The file has no header: raw little-endian float32, layer after layer.  A Conv2D
is its weights as out_channels blocks of [in][kh][kw] (PyTorch's layout), then
its out_channels biases; the Linear is its weights as [in_features][out_features]
(the transpose of PyTorch's), then its biases.  Its inputs are the last feature
map flattened channel by channel ([C][H][W], as Flatten does).

That project reads photos with OpenCV (BGR), resizes them to 224x224 with
cv2.resize's default (INTER_LINEAR) and scales them by 1/255, without mean or
std: the model :func:`load_reference` returns carries exactly that preprocessing
(``channel_order="BGR"``, ``interpolation="linear"``, ``image_size``, no mean or
std), so ``cyconv.predict`` and ``cyconv.save`` reproduce it.
"""
import os
import stat

import numpy as np

from cyconv import nn
from cyconv.models.simple import reference, size_pair

FLOAT_BYTES = 4


class ReferenceFormatError(ValueError):
    """A file that is not a reference model for these classes (says what was expected)."""


def layer_layout(model):
    """[(state_dict key, shape as stored in the file, transposed?)] in file order."""
    layout = []
    for path, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            transposed = isinstance(layer, nn.Linear)
            shape = layer.weight.shape[::-1] if transposed else layer.weight.shape
            layout += [(f"{path}.weight", shape, transposed), (f"{path}.bias", layer.bias.shape,
                                                               False)]
    return layout


def expected_bytes(num_classes, image_size=224):
    """The size in bytes of a reference model file for this many classes."""
    model = reference(num_classes, image_size)
    return FLOAT_BYTES * sum(int(np.prod(shape)) for _, shape, _ in layer_layout(model))


def load_reference(path, classes, image_size=224):
    """The reference network with the weights of the C++ project's file ``path``.

    ``classes``: the class names in the project's label order (their count fixes
    the Linear layer).  The model is in eval mode and carries the project's
    preprocessing (see the module docstring) and ``classes``.  Raises
    :class:`ReferenceFormatError` for a file of the wrong size (naming the expected
    and actual byte counts) or with values that are not finite; FileNotFoundError.
    """
    classes = _checked_classes(classes)
    model = reference(len(classes), image_size)
    layout = layer_layout(model)
    data = _read_floats(path, sum(int(np.prod(shape)) for _, shape, _ in layout), len(classes),
                        image_size)
    state, start = {}, 0
    for key, shape, transposed in layout:
        size = int(np.prod(shape))
        array = data[start:start + size].reshape(shape)
        state[key] = array.T if transposed else array
        start += size
    try:
        model.load_state_dict(state)
    except ValueError as error:
        raise ReferenceFormatError(f"{path}: {error}") from None
    h, w = size_pair(image_size)
    model.classes, model.mean, model.std = classes, None, None
    model.image_size, model.channel_order, model.interpolation = (h, w), "BGR", "linear"
    return model.eval()


def _checked_classes(classes):
    if not isinstance(classes, (list, tuple)) or not classes or len(set(classes)) != len(classes) \
            or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"load_reference: classes must be a list of distinct, non-empty "
                         f"names, got {classes!r:.80}")
    return list(classes)


def _read_floats(path, count, num_classes, image_size):
    """The file's ``count`` little-endian float32 values (ReferenceFormatError unless it
    has exactly that many bytes)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ReferenceFormatError(f"{path} is not a regular file")
    expected = count * FLOAT_BYTES
    if info.st_size != expected:
        h, w = size_pair(image_size)
        raise ReferenceFormatError(
            f"{path}: expected {expected} bytes for a reference model of {num_classes} classes "
            f"({h}x{w} images), the file has {info.st_size}{_size_hint(info.st_size, h, w)}")
    return np.fromfile(path, dtype="<f4").astype(np.float32)


def _size_hint(size, h, w):
    """' (a model of N classes?)' when ``size`` fits another number of classes."""
    one, two = expected_bytes(1, (h, w)), expected_bytes(2, (h, w))
    per_class = two - one
    extra = size - (one - per_class)
    if extra > 0 and extra % per_class == 0:
        return f" (the size of a model of {extra // per_class} classes)"
    return ""
