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
in [0, 1] (an all-zero map stays zero).  A model that sees only the middle of a
photo (``model.center_crop`` < 1) gets its map drawn over that middle, and 0
around it.  The score is the class logit before
the softmax, as in the paper.

Default layer: the *rectified* output of the last ``Conv2d`` the forward pass
runs, i.e. the first ReLU-type activation after it when only BatchNorm2d layers
sit in between (the last convolutional feature maps of the paper, where the
ReLU is part of the conv layer), otherwise that ``Conv2d`` itself.  ``layer``
may name any layer whose output is an (N, C, H, W) feature map: by dotted name
(``"layer4.1.conv2"``), top-level index, or the module (see
:mod:`cyconv.explain.layers`).  The activations and gradients are taken with
forward and backward hooks on that layer.

Grad-CAM runs the model in eval mode and restores its mode; the parameters'
``.grad`` arrays are saved and restored, so it never changes a model's
gradients (nor its weights, running statistics or dropout streams).
"""
from dataclasses import dataclass

import numpy as np

from cyconv._grad_mode import enable_grad
from cyconv._opencv import cv2
from cyconv.data.io import center_box
from cyconv.explain.drawing import softmax
from cyconv.explain.layers import describe, execution_order, resolve
from cyconv.inference import is_normalised, prepare_input
from cyconv.nn import BatchNorm2d, Conv2d, LeakyReLU, ReLU, ReLU6

ACTIVATIONS = (ReLU, ReLU6, LeakyReLU)


@dataclass
class GradCAMResult:
    """Everything :func:`gradcam` computed, with ``details=True``.

    ``heatmap``: the map(s) in [0, 1], as returned without details;
    ``class_index`` (N,) int64 and ``class_names`` (list, or None) explained;
    ``probabilities`` (N, classes) softmax of the logits; ``probability`` (N,)
    of the explained class; ``logits`` (N, classes); ``layer`` the dotted name of
    the layer used; ``activations`` A and ``gradients`` dA (N, K, h, w); ``weights``
    alpha (N, K); ``raw`` the map before upsampling and scaling,
    ReLU(sum_k alpha_k A_k) (N, h, w).  Arrays are float64.
    """
    heatmap: object
    class_index: np.ndarray
    class_names: object
    probabilities: np.ndarray
    probability: np.ndarray
    logits: np.ndarray
    layer: str
    activations: np.ndarray
    gradients: np.ndarray
    weights: np.ndarray
    raw: np.ndarray


def default_layer(model, x):
    """The dotted name of the layer Grad-CAM uses by default for input ``x`` (see the
    module docstring)."""
    order = execution_order(model, x)
    convs = [k for k, (_, module, _) in enumerate(order) if isinstance(module, Conv2d)]
    if not convs:
        raise ValueError("gradcam: the model has no Conv2d layer; Grad-CAM explains "
                         "convolutional feature maps")
    k = convs[-1]
    if order[k][1].fuse_relu:
        return order[k][0]
    j = k + 1
    while j < len(order) and isinstance(order[j][1], BatchNorm2d):
        j += 1
    return order[j][0] if j < len(order) and isinstance(order[j][1], ACTIVATIONS) \
        else order[k][0]


def _feature_map_choices(model, x):
    """Text naming the layers whose output is a feature map (for error messages)."""
    names = [name for name, _, shape in execution_order(model, x) if len(shape) == 4]
    shown = ", ".join(names[-8:])
    return f"... {shown}" if len(names) > 8 else shown


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


def upsample(raw, size):
    """A low-resolution map (h, w) -> ``size`` (H, W) bilinear, divided by its maximum."""
    big = cv2.resize(np.ascontiguousarray(raw, np.float64), (int(size[1]), int(size[0])),
                     interpolation=cv2.INTER_LINEAR)
    big = np.maximum(big, 0.0)
    top = big.max()
    return (big / top if top > 0 else big).astype(np.float32)


def photo_map(raw, size, fraction):
    """The map (H, W) = ``size`` of a photo whose middle ``fraction`` of each side the
    model saw: ``raw`` upsampled onto that box, 0 outside it."""
    if fraction == 1:
        return upsample(raw, size)
    top, left, h, w = center_box(*size, fraction)
    out = np.zeros(size, np.float32)
    out[top:top + h, left:left + w] = upsample(raw, (h, w))
    return out


def _record(model, name, module, x, class_index):
    """(logits, chosen classes, activations, gradients) of ``module`` for input ``x``:
    one forward and one backward of the whole model with hooks on ``module``."""
    seen = {}
    handles = [
        module.register_forward_hook(
            lambda m, inputs, out: seen.update(activations=np.array(out, np.float64))),
        module.register_full_backward_hook(
            lambda m, grad_in, grad_out: seen.update(gradients=np.array(grad_out[0],
                                                                        np.float64)))]
    try:
        with enable_grad():
            model.discard_saved()
            logits = model(x)
            if "activations" not in seen:
                raise ValueError(f"gradcam: layer {describe(name, module)} does not run in the "
                                 "model's forward pass")
            if logits.ndim != 2:
                raise ValueError(f"gradcam: the model's output has shape {logits.shape}, "
                                 "expected class scores (N, classes)")
            if seen["activations"].ndim != 4:
                raise ValueError(
                    f"gradcam: layer {describe(name, module)} outputs shape "
                    f"{seen['activations'].shape}, not (N, C, H, W) feature maps; choose a "
                    f"convolutional layer: {_feature_map_choices(model, x)}")
            chosen = _class_indices(class_index, logits, getattr(model, "classes", None))
            grad = np.zeros_like(logits)
            grad[np.arange(len(grad)), chosen] = 1
            model.backward(grad, input_grad=False)
    finally:
        for handle in handles:
            handle.remove()
    return np.array(logits, np.float64), chosen, seen["activations"], seen["gradients"]


def gradcam(model, image, layer=None, class_index=None, *, size=None, details=False):
    """The Grad-CAM heat map of ``model`` for ``image``: float32 in [0, 1].

    ``image``: a file name, an ``(H, W, 3)`` uint8 **RGB** photo (``cv2.imread``
    gives BGR: pass the file name instead), resized to ``model.image_size`` and
    normalised with the model's preprocessing, or a normalised float ``(3, H, W)``
    array -> an ``(H, W)`` map of the image's size.  A batch (list of photos or file
    names, ``(N, H, W, 3)`` uint8 or ``(N, 3, H, W)`` float) -> ``(N, H, W)`` maps,
    or a list of maps when the photos differ in size.
    ``layer``: dotted name, top-level index or module (default: the rectified last
    conv layer, see the module docstring).  ``class_index``: the class to explain,
    an int or a class name (one for all images, or one per image); default: each
    image's predicted class.  ``size``: (H, W) of the returned maps (default: each
    image's own size).  ``details=True`` returns a :class:`GradCAMResult`.
    """
    x, sizes, batched = prepare_input(model, image)
    name = default_layer(model, x[:1]) if layer is None else resolve(model, layer,
                                                                     "gradcam: layer")[0]
    module = model.get_submodule(name)
    params = model.parameters()
    saved_grads = [p.grad.copy() for p in params]
    was_training = model.training
    model.eval()
    try:
        logits, chosen, activations, gradients = _record(model, name, module, x, class_index)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad[...] = g
        model.train(was_training)
    weights = gradients.mean(axis=(2, 3))
    raw = np.maximum(np.einsum("nk,nkhw->nhw", weights, activations), 0.0)
    sizes = sizes if size is None else [tuple(size)] * len(sizes)
    fraction = 1.0 if is_normalised(image) else getattr(model, "center_crop", 1.0)
    maps = [photo_map(r, s, fraction) for r, s in zip(raw, sizes)]
    if not batched:
        heatmap = maps[0]
    elif len(set(sizes)) == 1:
        heatmap = np.stack(maps)
    else:
        heatmap = maps
    if not details:
        return heatmap
    probabilities = softmax(logits)
    classes = getattr(model, "classes", None)
    names = [classes[c] for c in chosen] if classes else None
    return GradCAMResult(heatmap=heatmap, class_index=chosen, class_names=names,
                         probabilities=probabilities,
                         probability=probabilities[np.arange(len(chosen)), chosen],
                         logits=logits, layer=name, activations=activations,
                         gradients=gradients, weights=weights, raw=raw)


