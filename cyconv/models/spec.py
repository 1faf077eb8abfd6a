"""Architecture specs: a JSON-able description of a model, and the model rebuilt from it.

A checkpoint stores its model's spec, which is how ``cyconv.load`` rebuilds the
model alone.  A spec is ``{"type": name, "args": {...}}`` (the constructor's
arguments) with, for a module that has sub-modules, ``"children": [[name,
spec], ...]`` in registration order.  Rebuilding calls the constructor with the
args and then puts every child built from its own spec in place, so a model
whose parts were swapped after construction (a new ``fc`` for fine-tuning)
comes back as it was saved.

Types: the layers of :mod:`cyconv.nn`, the containers (Sequential, Residual,
Concat, built from their children alone), the named models' blocks, and any
class given to :func:`register`.  Specs written by cyconv 0.1 (a list of layer
specs for a Sequential, nested ``{"type": "Sequential", "layers": [...]}``)
still load.
"""
import json
from collections import OrderedDict

import numpy as np

from cyconv import nn


class ArchitectureError(ValueError):
    """An architecture spec that cannot be written or built (says which part and why)."""


def _conv_args(layer):
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                padding=list(layer.padding), dilation=list(layer.dilation),
                groups=layer.groups, bias=layer.bias is not None, dtype=str(layer.dtype),
                fuse_relu=layer.fuse_relu)


def _pool_args(layer):
    return dict(kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                padding=list(layer.padding))


# type name -> (class, function module -> constructor kwargs)
_TYPES = {}
# containers: built from their children alone
_CONTAINERS = {
    "Sequential": lambda children: nn.Sequential(OrderedDict(children)),
    "Residual": lambda children: nn.Residual(**dict(children)),
    "Concat": lambda children: nn.Concat(*[child for _, child in children]),
}


def register(cls, args=lambda module: {}):
    """Make modules of class ``cls`` describable and rebuildable: ``args(module)`` gives
    the JSON-able keyword arguments that rebuild it with ``cls(**args)``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register: expected a Module subclass, got {cls!r}")
    _TYPES[cls.__name__] = (cls, args)


for _cls, _args in [
    (nn.Conv2d, _conv_args),
    (nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                               bias=m.bias is not None, dtype=str(m.dtype))),
    (nn.BatchNorm2d, lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum,
                                    dtype=str(m.dtype))),
    (nn.ReLU, lambda m: {}), (nn.ReLU6, lambda m: {}),
    (nn.LeakyReLU, lambda m: dict(negative_slope=m.negative_slope)),
    (nn.MaxPool2d, _pool_args),
    (nn.AvgPool2d, lambda m: dict(_pool_args(m), count_include_pad=m.count_include_pad)),
    (nn.AdaptiveAvgPool2d, lambda m: dict(output_size=1)),
    (nn.Flatten, lambda m: {}), (nn.Identity, lambda m: {}),
    (nn.Dropout, lambda m: dict(p=m.p, seed=m.seed)),
]:
    register(_cls, _args)


def describe(module):
    """The JSON-able spec of ``module`` (see the module docstring).  A class whose
    ``spec_class`` attribute names a registered base class is described as that base
    (cyconv.distributed.SyncBatchNorm: a BatchNorm2d that only computes differently)."""
    cls = getattr(type(module), "spec_class", type(module))
    kind = cls.__name__
    children = [[name, describe(child)] for name, child in module.named_children()]
    if kind in _CONTAINERS and cls is getattr(nn, kind):
        return {"type": kind, "children": children}
    if kind not in _TYPES or _TYPES[kind][0] is not cls:
        raise ArchitectureError(
            f"cannot describe a module of type {kind}: register it with "
            f"cyconv.models.register({kind}, args=...) (known types: {sorted(known_types())})")
    spec = {"type": kind, "args": _TYPES[kind][1](module)}
    if children:
        spec["children"] = children
    return spec


def known_types():
    return sorted(set(_TYPES) | set(_CONTAINERS))


def build(spec, where="model"):
    """The module described by ``spec`` (a dict, a legacy list, or JSON text of either)."""
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ArchitectureError(f"architecture is not valid JSON: {error}") from None
    if isinstance(spec, list):   # cyconv 0.1: the layers of a top-level Sequential
        spec = {"type": "Sequential", "layers": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ArchitectureError(f"{where}: expected a dict with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    children = _children(spec, where)
    if kind in _CONTAINERS:
        try:
            return _CONTAINERS[kind](children)
        except (TypeError, ValueError) as error:
            raise ArchitectureError(f"{where} ({kind}): {error}") from None
    if kind not in _TYPES:
        raise ArchitectureError(f"{where}: unknown type {kind!r}; known types are "
                                f"{known_types()} (a class of your own: cyconv.models.register)")
    module = _construct(kind, spec.get("args", {}), where)
    if "children" in spec:
        for name, _ in module.named_children():
            if name not in dict(children):
                delattr(module, name)
        for name, child in children:
            setattr(module, name, child)
    return module


def _children(spec, where):
    """[(name, built child)] of a spec ("layers" is cyconv 0.1's unnamed Sequential)."""
    if "layers" in spec:
        entries = spec["layers"]
        if not isinstance(entries, list):
            raise ArchitectureError(f"{where}: 'layers' must be a list")
        entries = [[str(i), s] for i, s in enumerate(entries)]
    else:
        entries = spec.get("children", [])
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in entries):
        raise ArchitectureError(f"{where}: 'children' must be a list of [name, spec] pairs")
    return [(name, build(child, f"{where}.{name}" if where != "model" else name))
            for name, child in entries]


def _construct(kind, args, where):
    if not isinstance(args, dict):
        raise ArchitectureError(f"{where} ({kind}): 'args' must be a dict, got {args!r:.80}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        if "dtype" in args:
            args["dtype"] = np.dtype(args["dtype"])
        return _TYPES[kind][0](**args)
    except (TypeError, ValueError) as error:
        raise ArchitectureError(f"{where} ({kind}): cannot build it with {args}: "
                                f"{error}") from None


def difference(expected, actual):
    """None when two specs describe the same architecture, else a text naming the first
    part that differs (dropout seeds are state, not architecture: they may differ)."""
    def walk(a, b, where):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return None if a == b else f"{where}: expected {a!r:.200}, got {b!r:.200}"
        if a.get("type") != b.get("type"):
            return f"{where}: expected a {a.get('type')}, got a {b.get('type')}"
        args_a, args_b = dict(a.get("args", {})), dict(b.get("args", {}))
        if a.get("type") == "Dropout":
            args_a.pop("seed", None)
            args_b.pop("seed", None)
        if args_a != args_b:
            return f"{where} ({a['type']}): expected {args_a}, got {args_b}"
        names_a = [n for n, _ in a.get("children", [])]
        names_b = [n for n, _ in b.get("children", [])]
        if names_a != names_b:
            return f"{where} ({a['type']}): expected parts {names_a}, got {names_b}"
        for (name, child_a), (_, child_b) in zip(a.get("children", []), b.get("children", [])):
            found = walk(child_a, child_b, f"{where}.{name}" if where != "model" else name)
            if found:
                return found
        return None

    return walk(_normalised(expected), _normalised(actual), "model")


def _normalised(spec):
    """A spec in the current form (legacy lists and "layers" become named children)."""
    if isinstance(spec, list):
        spec = {"type": "Sequential", "layers": spec}
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    if "layers" in spec:
        spec["children"] = [[str(i), s] for i, s in enumerate(spec.pop("layers"))]
    if "children" in spec:
        spec["children"] = [[name, _normalised(child)] for name, child in spec["children"]]
    return spec
