"""Feature maps: the activations of chosen layers of a model, and a picture of them.

::

    acts = cyconv.features(model, x, layers=[2, 6])      # {2: (N, C, H, W), 6: ...}
    logits, acts = cyconv.features(model, x, layers=[2], output=True)
    grid = cyconv.feature_grid(acts[2][0])               # (h, w, 3) uint8 RGB picture

``layers`` are indices into the top-level ``nn.Sequential`` (negative ones
count from the end, as in a list) or the layer objects themselves.  Each
recorded activation is a fresh copy: inside a ``Sequential`` the arrays
between layers are reused from call to call, so the features never change
under you when the model runs again.

``x`` is anything :func:`prepare_input` accepts: an image file name, an
``(H, W, 3)`` uint8 RGB photo (or a list / ``(N, H, W, 3)`` array of them),
which is resized to ``model.image_size`` and normalised with ``model.mean`` /
``model.std`` (the metadata :func:`cyconv.load` attaches), or an already
normalised float ``(3, H, W)`` / ``(N, 3, H, W)`` array, used as it is.
"""
from pathlib import Path

import cv2
import numpy as np

from cyconv._grad_mode import no_grad
from cyconv.nn import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, LeakyReLU, MaxPool2d, ReLU,
                       Sequential)

# layers whose output keeps the (N, C, H, W) feature-map layout of their input
SPATIAL = (Conv2d, BatchNorm2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, Dropout)
ACTIVATIONS = (ReLU, LeakyReLU)


# ---------------------------------------------------------------------------
# Walking a Sequential
# ---------------------------------------------------------------------------

def leaves(model):
    """[(top-level index, leaf layer)] of a Sequential in forward order (nested
    Sequentials are opened, so every entry is a single layer)."""
    if not isinstance(model, Sequential):
        raise TypeError(f"expected an nn.Sequential model, got {type(model).__name__}")

    def flat(layer):
        if isinstance(layer, Sequential):
            for child in layer:
                yield from flat(child)
        else:
            yield layer

    return [(i, leaf) for i, layer in enumerate(model.layers) for leaf in flat(layer)]


def describe(model, index):
    """'3 (ReLU)': a top-level layer for messages."""
    return f"{index} ({type(model.layers[index]).__name__})"


def layer_position(model, walk, layer, what="layer"):
    """The position in ``walk`` (see :func:`leaves`) whose output is ``layer``'s output.

    ``layer``: a top-level index (negative counts from the end) or a layer
    object (top-level or nested).  IndexError / ValueError with a clear message.
    """
    if isinstance(layer, (bool, np.bool_)):
        raise TypeError(f"{what} must be a layer index or a layer object, got {layer!r}")
    if isinstance(layer, (int, np.integer)):
        n = len(model.layers)
        if not -n <= layer < n:
            raise IndexError(f"{what} {layer} is out of range: the model has {n} top-level "
                             f"layers (0..{n - 1})")
        index = int(layer) % n
        return max(k for k, (i, _) in enumerate(walk) if i == index)
    for k, (_, leaf) in enumerate(walk):
        if leaf is layer:
            return k
    for i, top in enumerate(model.layers):
        if top is layer:
            return max(k for k, (j, _) in enumerate(walk) if j == i)
    raise ValueError(f"{what} {layer!r} is not a layer of this model")


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------

def _first_dtype(model):
    for _, leaf in leaves(model):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None:
            return np.dtype(dtype)
    return np.dtype(np.float32)


def prepare_input(model, images):
    """``(x, sizes, batched)``: the model's (N, 3, H, W) input, the (h, w) of each
    original image (what maps are upsampled to) and whether a batch was given.

    ``images``: a file name (str or Path); an ``(H, W, 3)`` uint8 RGB image; a
    list of such images / file names, or an ``(N, H, W, 3)`` uint8 array;
    a normalised float ``(3, H, W)`` or ``(N, 3, H, W)`` array (used as is).
    Photos are resized to ``model.image_size`` (when set) and normalised with
    ``model.mean`` / ``model.std`` (when set), as :func:`cyconv.predict` does.
    """
    from cyconv.data import normalize, read_image, resize

    dtype = _first_dtype(model)
    if isinstance(images, (str, Path)):
        images = read_image(images)
    if isinstance(images, np.ndarray) and images.dtype.kind == "f":
        if images.ndim == 3:
            images, batched = images[None], False
        elif images.ndim == 4:
            batched = True
        else:
            raise ValueError(f"expected a normalised (3, H, W) or (N, 3, H, W) float array, "
                             f"got shape {images.shape}")
        x = np.ascontiguousarray(images, dtype=dtype)
        return x, [tuple(x.shape[2:])] * len(x), batched
    if isinstance(images, np.ndarray) and images.ndim == 3:
        photos, batched = [images], False
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        photos, batched = list(images), True
    elif isinstance(images, (list, tuple)):
        photos, batched = [read_image(p) if isinstance(p, (str, Path)) else np.asarray(p)
                           for p in images], True
    else:
        raise TypeError(f"expected an image (H, W, 3) uint8, a batch of them, a file name or "
                        f"a normalised float array, got {type(images).__name__}")
    if not photos:
        raise ValueError("expected at least one image, got an empty batch")
    for photo in photos:
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 RGB images, got shape {photo.shape} "
                             f"dtype {photo.dtype} (normalised input must be a float "
                             "(N, 3, H, W) array)")
    sizes = [tuple(photo.shape[:2]) for photo in photos]
    size = getattr(model, "image_size", None)
    if size is not None:
        photos = [resize(photo, size) for photo in photos]
    elif len(set(sizes)) > 1:
        raise ValueError(f"images of different sizes {sorted(set(sizes))} and the model has "
                         "no image_size to resize them to")
    x = normalize(np.stack(photos), getattr(model, "mean", None), getattr(model, "std", None))
    return np.ascontiguousarray(x, dtype=dtype), sizes, batched


# ---------------------------------------------------------------------------
# Recording activations
# ---------------------------------------------------------------------------

def features(model, x, layers=None, *, output=False):
    """The outputs of the chosen layers of ``model`` for input ``x``.

    ``layers``: a top-level index, a layer object, or a list of them; None
    means every top-level layer.  Returns ``{index: array}`` (non-negative
    top-level indices, each array a copy shaped like that layer's output,
    with the batch dimension even for a single image).  With
    ``output=True`` returns ``(logits, {index: array})``; otherwise the
    forward pass stops after the last chosen layer.

    Runs in eval mode (the model's mode is restored) without keeping anything
    for backward, so it changes neither parameters, gradients, running
    statistics nor dropout streams.  ``x``: see :func:`prepare_input`.
    """
    walk = leaves(model)
    if layers is None:
        layers = list(range(len(model.layers)))
    elif not isinstance(layers, (list, tuple)):
        layers = [layers]
    wanted = {}
    for layer in layers:
        position = layer_position(model, walk, layer)
        wanted[position] = walk[position][0]
    if not walk:
        raise ValueError("the model has no layers")
    x, _, _ = prepare_input(model, x)
    stop = len(walk) - 1 if output else max(wanted, default=-1)
    recorded = {}
    was_training = model.training
    flags = [leaf._intermediate_output for _, leaf in walk]
    model.eval()
    try:
        with no_grad():
            h = x
            for k in range(stop + 1):
                leaf = walk[k][1]
                leaf._intermediate_output = k < len(walk) - 1
                h = leaf(h)
                if k in wanted:
                    recorded[wanted[k]] = np.array(h, copy=True)
    finally:
        for (_, leaf), flag in zip(walk, flags):
            leaf._intermediate_output = flag
        model.train(was_training)
    recorded = dict(sorted(recorded.items()))
    return (np.array(h, copy=True), recorded) if output else recorded


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------

def feature_grid(maps, columns=None, cell=64, pad=2, colormap=cv2.COLORMAP_VIRIDIS,
                 max_channels=None):
    """A picture of feature maps: one tile per channel, ``(h, w, 3)`` uint8 RGB.

    ``maps``: ``(C, H, W)`` (one image's channels).  Each tile is scaled to
    its own [min, max] (a constant channel is drawn black), coloured with
    ``colormap`` and enlarged with nearest-neighbour to ``cell`` pixels on its
    longer side; tiles are separated by ``pad`` white pixels, ``columns`` per
    row (default: about square).  ``max_channels`` keeps the first ones only.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"expected feature maps of shape (C, H, W), got {maps.shape}")
    if max_channels is not None:
        maps = maps[:max_channels]
    c, h, w = maps.shape
    columns = columns or int(np.ceil(np.sqrt(c)))
    rows = -(-c // columns)
    scale = cell / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    grid = np.full((rows * (th + pad) + pad, columns * (tw + pad) + pad, 3), 255, np.uint8)
    for i, channel in enumerate(maps):
        low, high = channel.min(), channel.max()
        unit = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
        tile = cv2.applyColorMap(np.round(unit * 255).astype(np.uint8), colormap)
        tile = cv2.resize(tile, (tw, th), interpolation=cv2.INTER_NEAREST)
        r, col = divmod(i, columns)
        y, x = pad + r * (th + pad), pad + col * (tw + pad)
        grid[y:y + th, x:x + tw] = cv2.cvtColor(tile, cv2.COLOR_BGR2RGB)
    return grid
