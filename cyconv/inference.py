"""Preparing images for a model (file names or RGB arrays) and predicting.

A model from :func:`cyconv.load` carries its preprocessing: ``image_size``,
``mean``/``std``, ``channel_order``, ``interpolation`` and ``center_crop`` (see
:mod:`cyconv.preprocessing`).  Photos are given as
file names (read with OpenCV, in the right colour order whatever it is) or as
RGB uint8 arrays; ``cv2.imread`` returns BGR, so pass the file name, or
``cv2.cvtColor(image, cv2.COLOR_BGR2RGB)``.
"""
from pathlib import Path

import numpy as np

from cyconv._grad_mode import no_grad


def model_dtype(model):
    """The dtype of the model's parameters (float32 when it has none)."""
    params = model.parameters()
    return params[0].data.dtype if params else np.dtype(np.float32)


def _as_photo(image):
    from cyconv.data import read_image

    if isinstance(image, (str, Path)):
        return read_image(image)
    photo = np.asarray(image)
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image or a file name, got an array "
                         f"of shape {photo.shape} and dtype {photo.dtype} (normalised input "
                         "must be a float (N, 3, H, W) array)")
    return photo


def model_view(model, photo):
    """The ``(H, W, 3)`` uint8 picture the model is given of a photo: its middle
    ``model.center_crop`` (when < 1), resized to ``model.image_size`` (when set)."""
    from cyconv.data import crop_center, resize

    fraction = getattr(model, "center_crop", 1.0)
    if fraction != 1:
        photo = crop_center(photo, fraction)
    size = getattr(model, "image_size", None)
    if size is None:
        return photo
    return resize(photo, size, getattr(model, "interpolation", "area"))


def is_normalised(images):
    """True for a float array, taken as the model's input as it is (no crop or resize)."""
    return isinstance(images, np.ndarray) and images.dtype.kind == "f"


def prepare_input(model, images):
    """``(x, sizes, batched)``: the model's (N, 3, H, W) input in the model's dtype, the
    (h, w) of each original image (what maps are drawn at) and whether a batch was given.

    ``images``: a file name (str or Path); an ``(H, W, 3)`` uint8 RGB image; a list of
    such images and file names, or an ``(N, H, W, 3)`` uint8 array; a normalised float
    ``(3, H, W)`` or ``(N, 3, H, W)`` array (used as is).  Photos are cropped and resized
    as :func:`model_view` says and normalised with the model's preprocessing.
    """
    from cyconv.data import normalize

    dtype = model_dtype(model)
    if is_normalised(images):
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a normalised (3, H, W) or (N, 3, H, W) float array, "
                             f"got shape {images.shape}")
        batched = images.ndim == 4
        x = np.ascontiguousarray(images if batched else images[None], dtype=dtype)
        return x, [tuple(x.shape[2:])] * len(x), batched
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        photos, batched = [_as_photo(images)], False
    elif isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray)
                                               and images.ndim == 4):
        photos, batched = [_as_photo(image) for image in images], True
    else:
        raise TypeError(f"expected an image (H, W, 3) uint8, a batch of them, a file name or "
                        f"a normalised float array, got {type(images).__name__}")
    if not photos:
        raise ValueError("expected at least one image, got an empty batch")
    sizes = [tuple(photo.shape[:2]) for photo in photos]
    photos = [model_view(model, photo) for photo in photos]
    if len({photo.shape for photo in photos}) > 1:
        raise ValueError(f"images of different sizes {sorted(set(sizes))} and the model has "
                         "no image_size to resize them to")
    x = normalize(np.stack(photos), getattr(model, "mean", None), getattr(model, "std", None),
                  getattr(model, "channel_order", "RGB"))
    return np.ascontiguousarray(x, dtype=dtype), sizes, batched


def flip_averaged(model, x):
    """Logits (N, classes) whose softmax is the mean of the model's class probabilities
    on ``x`` (N, C, H, W) and on ``x`` mirrored left to right (test-time augmentation):
    ``log((softmax(model(x)) + softmax(model(mirrored x))) / 2)``.  Runs the model as it
    is (call it in eval mode, without gradients)."""
    def log_softmax(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    plain = log_softmax(model(x))
    mirrored = log_softmax(model(np.ascontiguousarray(x[..., ::-1])))
    return (np.logaddexp(plain, mirrored) - np.log(2)).astype(plain.dtype, copy=False)


def predict(model, images, batch_size=64, flip=False):
    """Logits (N, classes), in the model's dtype, of a model in eval mode without gradients.

    ``images``: file names, RGB uint8 images (``(N, H, W, 3)`` or a list), or an
    already normalised ``(N, 3, H, W)`` float array; see :func:`prepare_input`.
    ``flip``: average the class probabilities of each image and its mirror image
    (:func:`flip_averaged`).  The model's train/eval mode is restored afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"predict: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"predict: flip must be True or False, got {flip!r}")
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with no_grad():
            for start in range(0, len(images), batch_size):
                x, _, _ = prepare_input(model, _batch(images, start, batch_size))
                outputs.append(flip_averaged(model, x) if flip else model(x))
    finally:
        model.train(was_training)
    if outputs:
        return np.concatenate(outputs)
    return np.empty((0, 0), model_dtype(model))


def _batch(images, start, size):
    chunk = images[start:start + size]
    return chunk if isinstance(chunk, np.ndarray) else list(chunk)
