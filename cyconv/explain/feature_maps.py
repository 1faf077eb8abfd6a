"""Feature maps: the activations of chosen layers of a model, and a picture of them.

::

    acts = cyconv.features(model, x, layers=["layer1", "layer2.0.conv1"])  # {name: (N, C, H, W)}
    logits, acts = cyconv.features(model, x, layers=[2], output=True)      # {"2": ...}
    grid = cyconv.feature_grid(acts["layer1"][0])                          # (h, w, 3) uint8

``layers`` are dotted names, top-level indices or modules (see
:mod:`cyconv.explain.layers`); the activations are recorded by forward hooks,
each a copy.  ``x`` is anything :func:`cyconv.inference.prepare_input` accepts:
an image file name, an ``(H, W, 3)`` uint8 RGB photo (or a list / ``(N, H, W, 3)``
array of them), resized and normalised with the model's preprocessing, or an
already normalised float ``(3, H, W)`` / ``(N, 3, H, W)`` array, used as it is.
"""
import numpy as np

from cyconv._grad_mode import no_grad
from cyconv._opencv import cv2
from cyconv.explain.layers import execution_order, resolve
from cyconv.inference import model_dtype, prepare_input


def features(model, x, layers=None, *, output=False):
    """The outputs of the chosen layers of ``model`` for input ``x``.

    ``layers``: a name, index or module, or a list of them; None means every
    top-level layer.  Returns ``{dotted name: array}`` in the order the layers were
    given (each array a copy shaped like that layer's output, with the batch
    dimension even for a single image); with ``output=True``, ``(logits, that dict)``.

    Runs in eval mode (the model's mode is restored) without keeping anything for
    backward, so it changes neither parameters, gradients, running statistics nor
    dropout streams.
    """
    if layers is None:
        layers = [name for name, _ in model.named_children()] or [""]
    elif not isinstance(layers, (list, tuple)):
        layers = [layers]
    chosen = [resolve(model, layer) if layer != "" else ("", model) for layer in layers]
    x, _, _ = prepare_input(model, x)
    recorded, handles = {}, []
    for name, module in chosen:
        handles.append(module.register_forward_hook(
            lambda m, inputs, out, name=name: recorded.__setitem__(name, np.array(out))))
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name, _ in chosen if name not in recorded]
    if missing:
        raise ValueError(f"layer(s) {missing} do not run in the model's forward pass")
    maps = {name: recorded[name] for name, _ in chosen}
    return (np.array(logits), maps) if output else maps


def output_shapes(model, input_shape):
    """[(dotted name, module, output shape)] of every leaf layer, in the order the forward
    pass runs them, for an
    input of ``input_shape`` (N, 3, H, W): computed from the shapes, no image needed."""
    return execution_order(model, np.zeros(input_shape, model_dtype(model)))


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
