"""ONNX export: ``cyconv.onnx.export(model, "model.onnx")``.

Needs the ``onnx`` package (``pip install "cyconv[onnx]"``, which also brings
onnxruntime to run the file); importing this module does not import it.

What the file holds
    The model's inference function, whatever mode the model is in: BatchNorm2d
    with its running statistics (BatchNormalization), Dropout left out (the
    identity at inference).  One input ``input`` (batch, 3, H, W) and one output
    ``output``; the batch dimension is dynamic, H and W are fixed to the image
    size when one is known (else dynamic too).  Everything is float32: a float64
    model is exported as float32 (the type every ONNX runtime supports for these
    operators), so its exported logits differ from its own by float32 rounding.
    Weights are named by their state_dict keys (``layer1.0.conv1.weight``).

Layers and operators
    Conv2d -> Conv (groups, dilation, stride, padding (h, w)), plus Relu when
    fuse_relu; Linear -> Gemm; BatchNorm2d -> BatchNormalization; MaxPool2d ->
    MaxPool; AvgPool2d -> AveragePool (count_include_pad);
    AdaptiveAvgPool2d -> GlobalAveragePool; ReLU -> Relu; ReLU6 -> Clip(0, 6);
    LeakyReLU -> LeakyRelu; Flatten -> Flatten; Residual, BasicBlock and
    InvertedResidual's shortcut -> Add; Concat -> Concat (axis 1); Identity,
    Dropout, Sequential (ResNet and MobileNetV2 are named Sequentials) add no operator of
    their own.

Metadata (``metadata_props``, every value JSON-encoded, as in a checkpoint)
    ``classes``, ``mean``, ``std``, ``image_size``, ``channel_order``,
    ``interpolation``, ``center_crop`` (see :mod:`cyconv.preprocessing`): a
    consumer keeps the middle center_crop of each side of a photo, resizes it to
    image_size with that interpolation, puts its channels in channel_order, and
    feeds (pixels / 255 - mean) / std as (N, 3, H, W) float32.

The model is walked through its public structure: the architecture spec
(:func:`cyconv.models.describe`) for the layers' arguments and the state_dict
for their arrays.  A module of any other class (one of your own, or a subclass
of a cyconv layer) is refused with an :class:`ExportError` naming its path,
before anything is written.  Hooks are not exported.
"""
import json

import numpy as np

from cyconv import __version__, nn
from cyconv.files import atomic_write
from cyconv.models import BasicBlock, InvertedResidual, describe
from cyconv.preprocessing import FIELDS as PREPROCESSING
from cyconv.preprocessing import PreprocessingError, checked_preprocessing

OPSET = 17
INPUT, OUTPUT = "input", "output"
EXPORTABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
              nn.AdaptiveAvgPool2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Flatten, nn.Identity,
              nn.Dropout, nn.Sequential, nn.Residual, nn.Concat, BasicBlock, InvertedResidual)
BASIC_BLOCK_MAIN = ["conv1", "bn1", "relu", "conv2", "bn2"]


class ExportError(ValueError):
    """A model or an argument that cannot be exported (says which layer and why)."""


def export(model, path, *, classes=None, mean=None, std=None, image_size=None,
           channel_order=None, interpolation=None, center_crop=None):
    """Write ``model`` to ``path`` as an ONNX file (atomically) and return the ModelProto.

    The preprocessing keywords default to the model's attributes of those names
    (a model from :func:`cyconv.load` has them) and go into the metadata; an
    ``image_size`` (int or (H, W)) fixes the input's H and W.  Raises
    :class:`ExportError` for a layer that cannot be exported (nothing is written),
    ImportError without the onnx package.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: expected a cyconv Module, got {type(model).__name__}")
    _check_exportable(model)
    onnx = _import_onnx()
    given = dict(classes=classes, mean=mean, std=std, image_size=image_size,
                 channel_order=channel_order, interpolation=interpolation,
                 center_crop=center_crop)
    meta = _preprocessing(model, given)
    shapes = _io_shapes(model, meta["image_size"])
    graph = _Graph(onnx, model.state_dict(keep_vars=True))
    graph.finish(graph.emit(describe(model), "", INPUT))
    proto = graph.model(type(model).__name__, *shapes)
    onnx.helper.set_model_props(proto, {name: json.dumps(meta[name]) for name in PREPROCESSING})
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return proto


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError('cyconv.onnx.export needs the onnx package: pip install "cyconv[onnx]" '
                          "(or pip install onnx onnxruntime)") from None
    return onnx


def _check_exportable(model):
    """ExportError naming the first module (in named_modules order) of a class export
    does not know; exact classes only, since a subclass may compute something else."""
    for path, module in model.named_modules():
        if type(module) not in EXPORTABLE:
            where = f"layer '{path}'" if path else "the model itself"
            raise ExportError(
                f"cannot export {where}: a {type(module).__name__}, which ONNX export does not "
                f"know (it knows {', '.join(sorted(c.__name__ for c in EXPORTABLE))})")


def _preprocessing(model, given):
    """The preprocessing fields (given, else the model's attributes), checked as a
    checkpoint's are, in their JSON form."""
    meta = {}
    for name in PREPROCESSING:
        value = given[name] if given[name] is not None else getattr(model, name, None)
        if value is None or isinstance(value, str):
            pass
        elif name == "classes":
            value = list(value)
        elif name == "image_size":
            value = np.asarray((value, value) if np.isscalar(value) else value).tolist()
        elif name in ("mean", "std"):   # float32 values written as short as they read back
            try:
                value = [float(str(v)) for v in np.asarray(value, np.float32).reshape(-1)]
            except (TypeError, ValueError):
                raise ExportError(f"export: {name} must be 3 numbers, got {value!r:.80}") from None
        elif isinstance(value, np.generic):   # a numpy number (center_crop)
            value = value.item()
        meta[name] = value
    try:
        checked = checked_preprocessing("export", meta, model)
    except PreprocessingError as error:
        raise ExportError(str(error)) from None
    size = checked["image_size"]
    return dict(checked, mean=meta["mean"], std=meta["std"],
                image_size=None if size is None else list(size))


def _io_shapes(model, image_size):
    """The input's and the output's shapes (None: unknown), batch dynamic."""
    if image_size is None:
        return ["batch", 3, "height", "width"], None
    try:
        out = model.output_shape((1, 3) + tuple(image_size))
    except ValueError as error:
        raise ExportError(f"export: the model does not take (N, 3, {image_size[0]}, "
                          f"{image_size[1]}) images: {error}") from None
    return ["batch", 3] + list(image_size), ["batch"] + list(out[1:])


def _child(path, name):
    return f"{path}.{name}" if path else name


class _Graph:
    """ONNX nodes and float32 initialisers, emitted from a spec in forward order."""

    def __init__(self, onnx, state):
        self.onnx, self.state = onnx, state
        self.nodes, self.initializers, self.names = [], [], {INPUT, OUTPUT}

    def node(self, op, inputs, name, **attributes):
        """Add an ``op`` node; its output (and the node) get a fresh name based on ``name``
        (a layer path; the op's name for the model itself)."""
        name = name.strip(".") or op.lower()
        out, n = name, 2
        while out in self.names:
            out, n = f"{name}_{n}", n + 1
        self.names.add(out)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def array(self, name, value):
        """An initialiser ``name`` (a state_dict key or a constant), float32, made once."""
        if name not in self.names:
            self.names.add(name)
            self.initializers.append(
                self.onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def weights(self, path, *names):
        """The initialisers of the layer's state entries ``names`` that it has."""
        keys = [_child(path, name) for name in names]
        return [self.array(key, self.state[key]) for key in keys if key in self.state]

    def emit(self, spec, path, x):
        """Nodes computing the module of ``spec`` (at ``path``) on tensor ``x``; its output."""
        children = dict(spec.get("children", []))
        return _EMITTERS[spec["type"]](self, spec.get("args", {}), children, path, x)

    def chain(self, children, names, path, x):
        for name in names:
            x = self.emit(children[name], _child(path, name), x)
        return x

    def finish(self, y):
        """Name the final tensor ``output``."""
        if y == INPUT:
            self.nodes.append(self.onnx.helper.make_node("Identity", [INPUT], [OUTPUT],
                                                         name=OUTPUT))
            return
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name == y:
                        names[i] = OUTPUT

    def model(self, name, input_shape, output_shape):
        helper, float32 = self.onnx.helper, self.onnx.TensorProto.FLOAT
        graph = helper.make_graph(self.nodes, name, [
            helper.make_tensor_value_info(INPUT, float32, input_shape)],
            [helper.make_tensor_value_info(OUTPUT, float32, output_shape)], self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="cyconv",
                                  producer_version=__version__)
        proto.ir_version = helper.find_min_ir_version_for(opsets)
        if output_shape is None:   # the output's rank (and what is fixed) by shape inference
            inferred = self.onnx.shape_inference.infer_shapes(proto)
            proto.graph.output[0].CopyFrom(inferred.graph.output[0])
        return proto


def _conv(g, a, children, path, x):
    y = g.node("Conv", [x] + g.weights(path, "weight", "bias"), path,
               kernel_shape=a["kernel_size"], strides=a["stride"], pads=a["padding"] * 2,
               dilations=a["dilation"], group=a["groups"])
    return g.node("Relu", [y], f"{path}.relu") if a["fuse_relu"] else y


def _pool(op, **extra):
    def emit(g, a, children, path, x):
        return g.node(op, [x], path, kernel_shape=a["kernel_size"], strides=a["stride"],
                      pads=a["padding"] * 2, **{k: f(a) for k, f in extra.items()})
    return emit


def _simple(op, **attributes):
    def emit(g, a, children, path, x):
        return g.node(op, [x], path, **{k: f(a) for k, f in attributes.items()})
    return emit


def _passthrough(g, a, children, path, x):
    return x


def _add(g, main, side, path):
    return g.node("Add", [main, side], f"{path}.add")


def _relu6(g, a, children, path, x):
    return g.node("Clip", [x, g.array("relu6.min", 0.0), g.array("relu6.max", 6.0)], path)


def _residual(g, a, children, path, x):
    return _add(g, g.chain(children, ["body"], path, x), g.chain(children, ["shortcut"], path, x),
                path)


def _concat(g, a, children, path, x):
    branches = [g.emit(spec, _child(path, name), x) for name, spec in children.items()]
    return g.node("Concat", branches, path, axis=1)


def _basic_block(g, a, children, path, x):
    main = g.chain(children, BASIC_BLOCK_MAIN, path, x)
    side = g.chain(children, ["downsample"] if "downsample" in children else [], path, x)
    return g.chain(children, ["relu_out"], path, _add(g, main, side, path))


def _inverted_residual(g, a, children, path, x):
    y = g.chain(children, ["conv"], path, x)
    return _add(g, y, x, path) if a["stride"] == 1 and a["inp"] == a["oup"] else y


_EMITTERS = {
    "Conv2d": _conv,
    "Linear": lambda g, a, children, path, x: g.node(
        "Gemm", [x] + g.weights(path, "weight", "bias"), path, transB=1),
    "BatchNorm2d": lambda g, a, children, path, x: g.node(
        "BatchNormalization",
        [x] + g.weights(path, "weight", "bias", "running_mean", "running_var"), path,
        epsilon=a["eps"]),
    "MaxPool2d": _pool("MaxPool"),
    "AvgPool2d": _pool("AveragePool", count_include_pad=lambda a: int(a["count_include_pad"])),
    "AdaptiveAvgPool2d": _simple("GlobalAveragePool"),
    "ReLU": _simple("Relu"),
    "ReLU6": _relu6,
    "LeakyReLU": _simple("LeakyRelu", alpha=lambda a: float(a["negative_slope"])),
    "Flatten": _simple("Flatten", axis=lambda a: 1),
    "Identity": _passthrough,
    "Dropout": _passthrough,
    "Sequential": lambda g, a, children, path, x: g.chain(children, list(children), path, x),
    "Residual": _residual,
    "Concat": _concat,
    "BasicBlock": _basic_block,
    "InvertedResidual": _inverted_residual,
}
