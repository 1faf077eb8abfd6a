"""Grad-CAM: where in the image a convolutional network looks for a class.

The class-discriminative localisation map of Selvaraju et al., "Grad-CAM:
Visual Explanations from Deep Networks via Gradient-based Localization"
(ICCV 2017), computed with the library's own backward passes::

    A      = the feature maps (N, K, h, w) of the chosen layer for the image
    dA     = d logit[c] / dA             (backward from the one-hot of class c
                                          through the layers after the chosen one)
    alpha  = mean of dA over h, w        (N, K): the importance of each map
    cam    = ReLU(sum_k alpha_k A_k)     (N, h, w)

then ``cam`` is upsampled to the image's size with bilinear interpolation
(``cv2.resize``, ``INTER_LINEAR``) and divided by its maximum, so that it lies
in [0, 1] (an all-zero map stays zero).  The score is the class logit before
the softmax, as in the paper.

Default layer: the *rectified* output of the last ``Conv2d``, i.e. the first
ReLU / LeakyReLU after it when only BatchNorm2d layers sit in between (the
last convolutional feature maps of the paper, where the ReLU is part of the
conv layer), otherwise the ``Conv2d`` itself.  ``layer`` may be any top-level
index (or layer object) whose output is an (N, C, H, W) feature map at or
after a ``Conv2d``: a Conv2d, BatchNorm2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d
or Dropout.

Grad-CAM runs the model in eval mode and restores its mode; the parameters'
``.grad`` arrays are saved and restored, so it never changes a model's
gradients (nor its weights, running statistics or dropout streams).
"""
from dataclasses import dataclass

import cv2
import numpy as np

from cyconv import _grad_mode
from cyconv.feature_maps import (ACTIVATIONS, SPATIAL, describe, layer_position, leaves,
                                 prepare_input)
from cyconv.nn import BatchNorm2d, Conv2d


@dataclass
class GradCAMResult:
    """Everything :func:`gradcam` computed, with ``details=True``.

    ``heatmap``: the map(s) in [0, 1], as returned without details;
    ``class_index`` (N,) int64 and ``class_names`` (list, or None) explained;
    ``probabilities`` (N, classes) softmax of the logits; ``probability`` (N,)
    of the explained class; ``logits`` (N, classes); ``layer`` the top-level
    index of the layer used; ``activations`` A and ``gradients`` dA
    (N, K, h, w); ``weights`` alpha (N, K); ``raw`` the map before upsampling
    and scaling, ReLU(sum_k alpha_k A_k) (N, h, w).  Arrays are float64.
    """
    heatmap: object
    class_index: np.ndarray
    class_names: object
    probabilities: np.ndarray
    probability: np.ndarray
    logits: np.ndarray
    layer: int
    activations: np.ndarray
    gradients: np.ndarray
    weights: np.ndarray
    raw: np.ndarray


class _enable_grad:
    """Grad mode on for the body (Grad-CAM needs backward even inside no_grad)."""

    def __enter__(self):
        self._previous = _grad_mode.is_grad_enabled()
        _grad_mode._state.enabled = True

    def __exit__(self, *exc_info):
        _grad_mode._state.enabled = self._previous
        return False


def _conv_positions(walk):
    return [k for k, (_, leaf) in enumerate(walk) if isinstance(leaf, Conv2d)]


def _feature_positions(walk):
    """Positions whose output is a spatial feature map: from the first Conv2d up to
    the first layer that is not SPATIAL (Flatten, Linear, global pooling)."""
    convs = _conv_positions(walk)
    if not convs:
        return []
    out = []
    for k in range(convs[0], len(walk)):
        if not isinstance(walk[k][1], SPATIAL):
            break
        out.append(k)
    return out


def _conv_choices(model, walk):
    """Text naming the top-level layers Grad-CAM accepts (for error messages)."""
    tops = sorted({walk[k][0] for k in _feature_positions(walk)})
    convs = sorted({walk[k][0] for k in _conv_positions(walk) if walk[k][0] in tops})
    return (f"{tops[0]}..{tops[-1]} (Conv2d at {', '.join(map(str, convs))}; "
            "or a BatchNorm2d, ReLU or pooling layer among them)")


def default_layer(model):
    """The top-level index Grad-CAM uses by default (see the module docstring)."""
    walk = leaves(model)
    return walk[_default_position(model, walk)][0]


def _default_position(model, walk):
    convs = _conv_positions(walk)
    if not convs:
        raise ValueError("gradcam: the model has no Conv2d layer; Grad-CAM explains "
                         "convolutional feature maps")
    k = convs[-1]
    if walk[k][1].fuse_relu:
        return k
    j = k + 1
    while j < len(walk) and isinstance(walk[j][1], BatchNorm2d):
        j += 1
    return j if j < len(walk) and isinstance(walk[j][1], ACTIVATIONS) else k


def _resolve(model, walk, layer):
    if layer is None:
        return _default_position(model, walk)
    k = layer_position(model, walk, layer, "gradcam: layer")
    if k in _feature_positions(walk):
        return k
    if not _conv_positions(walk):
        raise ValueError("gradcam: the model has no Conv2d layer; Grad-CAM explains "
                         "convolutional feature maps")
    name = walk[k][0] if isinstance(layer, (int, np.integer)) else repr(layer)
    raise ValueError(f"gradcam: layer {name} ({type(walk[k][1]).__name__}) is not a "
                     "convolutional layer: Grad-CAM needs the (N, C, H, W) feature maps of a "
                     "Conv2d or of a layer after it that keeps them; choose one of the layers "
                     f"{_conv_choices(model, walk)}; default: "
                     f"{describe(model, walk[_default_position(model, walk)][0])}")


def _class_indices(class_index, logits, classes):
    n, num_classes = logits.shape
    if class_index is None:
        return np.argmax(logits, axis=1).astype(np.int64)
    many = isinstance(class_index, (list, tuple, np.ndarray))
    values = class_index if many else [class_index] * n
    if len(values) != n:
        raise ValueError(f"gradcam: {len(values)} class indices for {n} images")
    out = []
    for value in values:
        if isinstance(value, str):
            if not classes or value not in classes:
                raise ValueError(f"gradcam: unknown class {value!r}; the model's classes are "
                                 f"{classes}")
            value = classes.index(value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                or not -num_classes <= value < num_classes:
            raise ValueError(f"gradcam: class_index must be an int in [0, {num_classes}) or a "
                             f"class name, got {value!r}")
        out.append(int(value) % num_classes)
    return np.array(out, np.int64)


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def upsample(raw, size):
    """A low-resolution map (h, w) -> ``size`` (H, W) bilinear, divided by its maximum."""
    big = cv2.resize(np.ascontiguousarray(raw, np.float64), (int(size[1]), int(size[0])),
                     interpolation=cv2.INTER_LINEAR)
    big = np.maximum(big, 0.0)
    top = big.max()
    return (big / top if top > 0 else big).astype(np.float32)


def gradcam(model, image, layer=None, class_index=None, *, details=False):
    """The Grad-CAM heat map of ``model`` for ``image``: float32 in [0, 1].

    ``image``: a file name, an ``(H, W, 3)`` uint8 RGB photo (resized to
    ``model.image_size`` and normalised with ``model.mean``/``model.std``), or
    a normalised float ``(3, H, W)`` array -> an ``(H, W)`` map of the image's
    size.  A batch (list of photos, ``(N, H, W, 3)`` uint8 or ``(N, 3, H, W)``
    float) -> ``(N, H, W)`` maps, or a list of maps when the photos differ
    in size.
    ``layer``: top-level index or layer object (default: the rectified last
    conv layer, see the module docstring).  ``class_index``: the class to
    explain, an int or a class name (one for all images, or one per image);
    default: each image's predicted class.
    ``details=True`` returns a :class:`GradCAMResult` instead of the map.
    """
    walk = leaves(model)
    k = _resolve(model, walk, layer)
    x, sizes, batched = prepare_input(model, image)
    params = model.parameters()
    saved_grads = [p.grad.copy() for p in params]
    flags = [(leaf._intermediate_output, leaf._intermediate_grad) for _, leaf in walk]
    was_training = model.training
    model.eval()
    try:
        with _enable_grad():
            h = x
            for j, (_, leaf) in enumerate(walk):
                leaf._intermediate_output = j < len(walk) - 1
                h = leaf(h)
                if j == k:
                    activations = np.array(h, dtype=np.float64)
            if h.ndim != 2:
                raise ValueError(f"gradcam: the model's output has shape {h.shape}, expected "
                                 "class scores (N, classes)")
            if activations.ndim != 4:
                raise ValueError(f"gradcam: layer {walk[k][0]} outputs shape "
                                 f"{activations.shape}, not (N, C, H, W) feature maps")
            logits = np.array(h, dtype=np.float64)
            classes = getattr(model, "classes", None)
            chosen = _class_indices(class_index, logits, classes)
            grad = np.zeros_like(h)
            grad[np.arange(len(grad)), chosen] = 1
            for j in range(len(walk) - 1, k, -1):
                walk[j][1]._intermediate_grad = True
                grad = walk[j][1].backward(grad)
            gradients = np.array(grad, dtype=np.float64)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad[...] = g
        for (_, leaf), (out_flag, grad_flag) in zip(walk, flags):
            leaf._intermediate_output, leaf._intermediate_grad = out_flag, grad_flag
        model.train(was_training)

    weights = gradients.mean(axis=(2, 3))
    raw = np.maximum(np.einsum("nk,nkhw->nhw", weights, activations), 0.0)
    maps = [upsample(r, size) for r, size in zip(raw, sizes)]
    if not batched:
        heatmap = maps[0]
    elif len(set(sizes)) == 1:
        heatmap = np.stack(maps)
    else:
        heatmap = maps
    if not details:
        return heatmap
    probabilities = _softmax(logits)
    names = [classes[c] for c in chosen] if classes else None
    return GradCAMResult(heatmap=heatmap, class_index=chosen, class_names=names,
                         probabilities=probabilities,
                         probability=probabilities[np.arange(len(chosen)), chosen],
                         logits=logits, layer=walk[k][0], activations=activations,
                         gradients=gradients, weights=weights, raw=raw)


def overlay(image, heatmap, alpha=0.45, text=None, colormap=cv2.COLORMAP_JET):
    """The photo with the heat map blended over it: ``(H, W, 3)`` uint8 RGB.

    ``image``: (H, W, 3) uint8 RGB; ``heatmap``: values in [0, 1] of any size
    (resized to the image's).  The map is coloured with ``colormap`` (jet: red
    = high) and mixed as ``(1 - alpha) * image + alpha * colour``.  ``text``
    (optional) is written at the top left on a dark band.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay: expected an (H, W, 3) uint8 RGB image, got {image.shape} "
                         f"{image.dtype}")
    h, w = image.shape[:2]
    heat = np.asarray(heatmap, np.float32)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), colormap)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 1.0 - alpha, colour, alpha, 0.0)
    if text:
        put_label(blended, text)
    return blended


def put_label(image, text, scale=None, bottom=False):
    """Write ``text`` in white on a dark band at the top left (or bottom left) of
    ``image``, in place."""
    h, w = image.shape[:2]
    scale = scale or max(0.45, min(h, w) / 400)
    thickness = max(1, round(scale * 2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    margin = max(3, round(6 * scale))
    while tw + 2 * margin > w and scale > 0.2:        # shrink to fit the width
        scale *= max(0.5, min(0.97, (w - 2 * margin) / tw))
        thickness = max(1, round(scale * 2))
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    band_h = th + base + 2 * margin
    top = h - band_h if bottom else 0
    band = image[max(0, top):top + band_h, :min(w, tw + 2 * margin)]
    band[...] = (band * 0.35).astype(np.uint8)
    cv2.putText(image, text, (margin, top + margin + th), font, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
    return image
