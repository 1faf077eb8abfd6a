"""Named architectures and JSON-able architecture specs.

Any ``nn.Sequential`` of cyconv layers can be described by :func:`architecture`
as a list of layer specs, ``{"type": "Conv2d", "args": {...}}`` (nested
``Sequential`` layers as ``{"type": "Sequential", "layers": [...]}``), and
rebuilt from it by :func:`build`.  A checkpoint stores that list (as JSON) in
its metadata, which is how ``cyconv.load`` rebuilds a model on its own.

Named architectures (:func:`create`, see :data:`ARCHITECTURES`):

``reference``
    The reference project's network: Conv 3->16 k3 s2, ReLU, MaxPool 2,
    Conv 16->32 k3 s2, ReLU, Conv 32->64 k3 s2, ReLU, Conv 64->128 k3 s2, ReLU,
    Flatten, Linear (128 * s * s -> classes; 4608 for 224x224 images).
``small``
    The default recipe's network: four stages of padded 3x3 Conv (no bias) +
    BatchNorm + ReLU + MaxPool 2 (a stem of stride 2 for images of 128 px
    or more), global average pooling, Dropout and a Linear classifier.

:func:`to_torch` builds the equivalent ``torch.nn.Sequential`` (when PyTorch
is installed): its ``state_dict`` has the same keys and shapes, so cyconv's
checkpoints load into it.
"""
import json

import numpy as np

from cyconv import nn
from cyconv.nn.conv import output_size


class ArchitectureError(ValueError):
    """An architecture spec that cannot be built (says which layer and why)."""


def _conv_args(layer):
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                padding=list(layer.padding), dilation=list(layer.dilation),
                bias=layer.bias is not None, dtype=str(layer.dtype), fuse_relu=layer.fuse_relu)


def _pool_args(layer):
    return dict(kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                padding=list(layer.padding))


# type name -> (class, function layer -> constructor kwargs)
LAYERS = {
    "Conv2d": (nn.Conv2d, _conv_args),
    "Linear": (nn.Linear, lambda l: dict(in_features=l.in_features, out_features=l.out_features,
                                         bias=l.bias is not None, dtype=str(l.dtype))),
    "BatchNorm2d": (nn.BatchNorm2d, lambda l: dict(num_features=l.num_features, eps=l.eps,
                                                   momentum=l.momentum, dtype=str(l.dtype))),
    "ReLU": (nn.ReLU, lambda l: {}),
    "LeakyReLU": (nn.LeakyReLU, lambda l: dict(negative_slope=l.negative_slope)),
    "MaxPool2d": (nn.MaxPool2d, _pool_args),
    "AvgPool2d": (nn.AvgPool2d, lambda l: dict(_pool_args(l),
                                               count_include_pad=l.count_include_pad)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda l: dict(output_size=1)),
    "Flatten": (nn.Flatten, lambda l: {}),
    "Dropout": (nn.Dropout, lambda l: dict(p=l.p, seed=l.seed)),
}


def layer_spec(layer):
    """The JSON-able spec of one layer: {"type": name, "args": kwargs} (or a nested Sequential)."""
    if isinstance(layer, nn.Sequential):
        return {"type": "Sequential", "layers": [layer_spec(child) for child in layer]}
    name = type(layer).__name__
    if name not in LAYERS or type(layer) is not LAYERS[name][0]:
        raise ArchitectureError(f"cannot describe a layer of type {type(layer).__name__}: "
                                f"supported types are {sorted(LAYERS) + ['Sequential']}")
    return {"type": name, "args": LAYERS[name][1](layer)}


def architecture(model):
    """The list of layer specs of a Sequential (JSON-able; see :func:`build`)."""
    if not isinstance(model, nn.Sequential):
        raise ArchitectureError(f"expected an nn.Sequential, got {type(model).__name__}")
    return [layer_spec(layer) for layer in model]


def _build_layer(spec, where):
    if not isinstance(spec, dict) or "type" not in spec:
        raise ArchitectureError(f"layer {where}: expected a dict with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    if kind == "Sequential":
        layers = spec.get("layers")
        if not isinstance(layers, list):
            raise ArchitectureError(f"layer {where}: a Sequential spec needs a 'layers' list")
        return nn.Sequential(*[_build_layer(s, f"{where}.{i}") for i, s in enumerate(layers)])
    if kind not in LAYERS:
        raise ArchitectureError(f"layer {where}: unknown layer type {kind!r}; "
                                f"supported types are {sorted(LAYERS) + ['Sequential']}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ArchitectureError(f"layer {where} ({kind}): 'args' must be a dict, got {args!r:.80}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    if "dtype" in args:
        args["dtype"] = np.dtype(args["dtype"])
    try:
        return LAYERS[kind][0](**args)
    except (TypeError, ValueError) as error:
        raise ArchitectureError(f"layer {where} ({kind}): cannot build it with {args}: "
                                f"{error}") from None


def build(spec):
    """A Sequential built from a list of layer specs (or its JSON text)."""
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ArchitectureError(f"architecture is not valid JSON: {error}") from None
    if not isinstance(spec, list):
        raise ArchitectureError(f"architecture must be a list of layer specs, got "
                                f"{type(spec).__name__}")
    return nn.Sequential(*[_build_layer(s, str(i)) for i, s in enumerate(spec)])


def architecture_difference(expected, actual):
    """None when two architecture specs match, else a text naming the first layer that differs."""
    if json.dumps(expected, sort_keys=True) == json.dumps(actual, sort_keys=True):
        return None

    def strip(spec):  # the dropout seed is state, not shape: it may differ
        spec = json.loads(json.dumps(spec))
        if spec.get("type") == "Dropout":
            spec.get("args", {}).pop("seed", None)
        if spec.get("type") == "Sequential":
            spec["layers"] = [strip(s) for s in spec.get("layers", [])]
        return spec

    for i in range(max(len(expected), len(actual))):
        if i >= len(expected):
            return f"layer {i} ({actual[i].get('type')}) is extra"
        if i >= len(actual):
            return f"layer {i} ({expected[i].get('type')}) is missing"
        if strip(expected[i]) != strip(actual[i]):
            return f"layer {i}: expected {expected[i]}, got {actual[i]}"
    return None


# ---------------------------------------------------------------------------
# Named architectures
# ---------------------------------------------------------------------------

def _size_pair(image_size):
    return (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)


def reference(num_classes, image_size=224):
    """The reference project's network (4608 -> classes Linear for 224x224 input)."""
    h, w = _size_pair(image_size)
    for k, s in ((3, 2), (2, 2), (3, 2), (3, 2), (3, 2)):   # conv, pool, conv, conv, conv
        h, w = output_size(h, k, s, 0, 1), output_size(w, k, s, 0, 1)
    if h < 1 or w < 1:
        raise ArchitectureError(f"reference: image size {image_size} is too small "
                                "(at least 47 pixels)")
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * h * w, num_classes))


def small(num_classes, image_size=128, widths=(24, 48, 96, 192), dropout=0.2):
    """Padded 3x3 Conv + BN + ReLU + MaxPool stages, global average pooling, Dropout, Linear.

    Images of 128 px or more first go through a 3x3 stride-2 stem (Conv + BN + ReLU).
    """
    h, w = _size_pair(image_size)
    layers, channels = [], 3
    if min(h, w) >= 128:
        layers += [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        channels = widths[0]
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


ARCHITECTURES = {"reference": reference, "small": small}


def create(name, num_classes, image_size, **kwargs):
    """The named architecture ``name`` (see :data:`ARCHITECTURES`) for this many classes."""
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {name!r}; choose one of "
                                f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](num_classes, image_size, **kwargs)


# ---------------------------------------------------------------------------
# PyTorch equivalent
# ---------------------------------------------------------------------------

def to_torch(spec):
    """The equivalent torch.nn.Sequential of an architecture spec (or a cyconv Sequential).

    Its state_dict has the same keys and shapes as the cyconv model's, so
    ``torch_model.load_state_dict(safetensors.torch.load_file(path))`` works.
    """
    import torch

    if isinstance(spec, nn.Module):
        spec = architecture(spec)
    T = torch.nn
    dtypes = {"float32": torch.float32, "float64": torch.float64}

    def one(s):
        kind, a = s["type"], dict(s.get("args", {}))
        if kind == "Sequential":
            return T.Sequential(*[one(c) for c in s["layers"]])
        dtype = dtypes[a.pop("dtype", "float32")]
        if kind == "Conv2d":
            fuse = a.pop("fuse_relu", False)
            conv = T.Conv2d(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()},
                            dtype=dtype)
            if fuse:
                raise ArchitectureError("to_torch: Conv2d(fuse_relu=True) has no torch "
                                        "equivalent with the same state_dict keys")
            return conv
        if kind == "Linear":
            return T.Linear(**a, dtype=dtype)
        if kind == "BatchNorm2d":
            return T.BatchNorm2d(**a, dtype=dtype)
        if kind == "Dropout":
            return T.Dropout(a["p"])
        if kind in ("MaxPool2d", "AvgPool2d"):
            return getattr(T, kind)(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in a.items()})
        return getattr(T, kind)(**a)

    return T.Sequential(*[one(s) for s in spec])
