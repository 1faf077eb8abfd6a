"""``to_torch``: the PyTorch model equivalent to a cyconv model (when PyTorch is installed).

Its state_dict has the same keys and shapes, so a cyconv checkpoint loads into it
(``torch_model.load_state_dict(safetensors.torch.load_file(path))``), and it computes
the same function.  Built from the architecture spec, so it works for every type the
spec knows (:mod:`cyconv.models.spec`) except classes registered by a user.
"""
from collections import OrderedDict

from cyconv.models.spec import ArchitectureError, _normalised, describe


def to_torch(model):
    """The equivalent ``torch.nn.Module`` of a cyconv model or of its architecture spec."""
    import torch

    from cyconv import nn
    spec = describe(model) if isinstance(model, nn.Module) else _normalised(model)
    return _TorchBuilder(torch).build(spec)


class _TorchBuilder:
    """Builds torch modules from specs; the torch classes are defined once torch is imported."""

    def __init__(self, torch):
        self.torch = torch
        self.T = torch.nn
        self.dtypes = {"float32": torch.float32, "float64": torch.float64}
        self.composites = _composite_classes(torch)

    def build(self, spec):
        kind, args = spec["type"], dict(spec.get("args", {}))
        children = OrderedDict((name, self.build(child))
                               for name, child in spec.get("children", []))
        if kind in self.composites:
            return self.composites[kind](children, args)
        return self.leaf(kind, args)

    def leaf(self, kind, a):
        T = self.T
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in a.items()}
        dtype = self.dtypes[tupled.pop("dtype", "float32")]
        if kind == "Conv2d":
            if tupled.pop("fuse_relu", False):
                raise ArchitectureError("to_torch: Conv2d(fuse_relu=True) has no torch "
                                        "equivalent with the same state_dict keys")
            return T.Conv2d(**tupled, dtype=dtype)
        if kind in ("Linear", "BatchNorm2d"):
            return getattr(T, kind)(**tupled, dtype=dtype)
        if kind == "Dropout":
            return T.Dropout(tupled["p"])
        if kind in ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "ReLU", "ReLU6", "LeakyReLU",
                    "Flatten", "Identity"):
            return getattr(T, kind)(**tupled)
        raise ArchitectureError(f"to_torch: no PyTorch equivalent for a {kind}")


def _composite_classes(torch):
    """{type: function(children, args) -> torch module} for cyconv's containers and blocks."""
    T = torch.nn

    class Residual(T.Module):
        def __init__(self, children):
            super().__init__()
            self.body, self.shortcut = children["body"], children["shortcut"]

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    class Concat(T.Module):
        def __init__(self, children):
            super().__init__()
            for name, child in children.items():
                self.add_module(name, child)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.children()], dim=1)

    class BasicBlock(T.Module):
        def __init__(self, children):
            super().__init__()
            for name, child in children.items():
                self.add_module(name, child)

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            side = x if getattr(self, "downsample", None) is None else self.downsample(x)
            return self.relu_out(out + side)

    class InvertedResidual(T.Module):
        def __init__(self, children, use_res_connect):
            super().__init__()
            self.conv, self.use_res_connect = children["conv"], use_res_connect

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    return {
        "Sequential": lambda children, args: T.Sequential(children),
        "Residual": lambda children, args: Residual(children),
        "Concat": lambda children, args: Concat(children),
        "BasicBlock": lambda children, args: BasicBlock(children),
        "InvertedResidual": lambda children, args: InvertedResidual(
            children, args["stride"] == 1 and args["inp"] == args["oup"]),
    }
