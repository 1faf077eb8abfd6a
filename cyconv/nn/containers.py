"""Containers: Sequential, Residual (a body plus a shortcut), Concat (branches side by
side) and Identity.  Each has a forward and a backward, so blocks built from them
need no backward of their own.

Inside a container, a Conv2d or BatchNorm2d followed by a ReLU runs as one kernel
pass, and so do a BatchNorm2d followed by a ReLU6, and a BatchNorm2d followed by a
ReLU and a 2x2 MaxPool2d with stride 2.  A Conv2d followed by a ReLU and a MaxPool2d
masks the gradient by the pooled output, so its full-size output is not kept for
the backward.  In inference (eval mode under no_grad), a
Conv2d folds the BatchNorm2d after it into its weight and bias, and applies a ReLU or
ReLU6 after that in its kernels.  None of them may have hooks; the layers and their
state_dict keys stay as written.
"""
from collections import OrderedDict

import numpy as np

from cyconv import _activation
from cyconv._checks import as_float_array, as_grad_output, shape_text
from cyconv._threads import threads_for
from cyconv.nn.module import Module, naming_errors


def add_into(out, a, b, activation=0):
    """out = a + b for arrays of out's shape (the sum of a residual connection, or the
    gradients of an input used twice), then the activation of that code (see
    ACTIVATION_CODES; 0: none), on the kernel threads; returns out.  The callers
    check the shapes for the user; a mismatch here would make the kernel read past an
    array, so it is refused."""
    if np.shape(a) != out.shape or np.shape(b) != out.shape:
        raise ValueError(f"add_into: expected two arrays of shape {shape_text(out.shape)}, "
                         f"got {shape_text(np.shape(a))} and {shape_text(np.shape(b))}")
    a, b = (np.ascontiguousarray(v, dtype=out.dtype) for v in (a, b))
    _activation.add_arrays(a.reshape(-1), b.reshape(-1), out.reshape(-1), activation,
                           threads_for(out.size))
    return out


def forward_chain(layers, x):
    """x through ``layers`` in order, fusing a layer with those after it that it can
    compute in its own kernels (an activation; or a ReLU and a max-pool)."""
    i = 0
    while i < len(layers):
        layer, absorbed = layers[i], _absorbed(layers, i)
        if absorbed:
            with naming_errors(layer):   # as layer(x) would, when no deeper module did
                x = layer._forward_absorbing(x, absorbed)
            for following in absorbed:
                x = following._absorb(x)
        else:
            x = layer(x)
        i += 1 + len(absorbed)
    return x


def _absorbed(layers, i):
    """The layers after layers[i] that it computes in its own kernels: none, one (an
    activation; a BatchNorm2d folded into a Conv2d) or two (an activation and a pooling
    layer; a folded BatchNorm2d and a ReLU or ReLU6).  A next layer that would absorb
    two of its own (BatchNorm2d + ReLU + MaxPool2d) is left whole: one pass over the
    large array.  A layer with hooks is never fused (its hooks must see it)."""
    run = []
    for following in layers[i + 1:i + 3]:
        if following._hooked():
            break
        run.append(following)
    layer = layers[i]
    if layer._hooked() or not run or not layer._can_absorb(run[0]):
        return []
    if len(_absorbed(layers, i + 1)) == 2:   # the next layer fuses more on its own
        return []
    return run if len(run) == 2 and layer._can_absorb_second(*run) else run[:1]


def backward_chain(layers, grad, input_grad):
    """grad back through ``layers`` in reverse; input_grad=False: the first layer
    computes no input gradient (and None is returned)."""
    for i in range(len(layers) - 1, 0, -1):
        grad = layers[i].backward(grad)
    return layers[0].backward(grad, input_grad=input_grad) if layers else grad


class Sequential(Module):
    """Layers applied in order.

    ``Sequential(a, b, c)`` names its layers "0", "1", "2" (state_dict keys "0.weight"
    ...); ``Sequential(OrderedDict(conv=a, bn=b))`` uses the given names, as in PyTorch.
    """

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            named = list(layers[0].items())
        else:
            named = [(str(i), layer) for i, layer in enumerate(layers)]
        for i, (name, layer) in enumerate(named):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: expected a Module at position {i}, "
                                f"got {type(layer).__name__}")
            self._modules[str(name)] = layer

    def _set_child(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"Sequential: expected a Module for {name!r}, "
                            f"got {type(module).__name__}")
        self._modules[name] = module

    def __getattr__(self, name):
        """A child by name (``Sequential(OrderedDict(fc=...)).fc``), as in PyTorch."""
        child = self.__dict__.get("_modules", {}).get(name)
        if child is None:
            raise AttributeError(f"Sequential has no attribute or child {name!r}")
        return child

    def append(self, layer):
        self._set_child(str(len(self._modules)), layer)
        return self

    def __getitem__(self, index):
        layers = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(OrderedDict(list(self._modules.items())[index]))
        return layers[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self._modules.values():
            with naming_errors(layer):
                shape = layer.output_shape(shape)
        return shape

    def forward(self, x):
        return forward_chain(list(self._modules.values()), x)

    def backward(self, grad_output, input_grad=True):
        return backward_chain(list(self._modules.values()), grad_output, input_grad)


class Identity(Module):
    """y = x (the same array); dx = dy."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def forward(self, x):
        x = as_float_array(self, x)
        self._save_for_backward(x.shape, x.dtype)
        return x

    def backward(self, grad_output, input_grad=True):
        shape, dtype = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, shape, dtype)
        return grad_output if input_grad else None


class Residual(Module):
    """y = body(x) + shortcut(x); the identity is the shortcut when none is given.

    Backward: dy flows into both, and their input gradients are summed.  Body and
    shortcut must give outputs of the same shape (a ResNet downsample shortcut is
    ``Sequential(Conv2d(..., 1, stride=2, bias=False), BatchNorm2d(...))``).
    """

    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body = body
        self.shortcut = Identity() if shortcut is None else shortcut

    def output_shape(self, input_shape):
        with naming_errors(self.body):
            main = self.body.output_shape(input_shape)
        with naming_errors(self.shortcut):
            side = self.shortcut.output_shape(input_shape)
        if main != side:
            raise ValueError(f"Residual: the body gives {shape_text(main)} but the shortcut "
                             f"{shape_text(side)} for input {shape_text(input_shape)}; they must "
                             "match to be added")
        return main

    def forward(self, x):
        _check_before_running(self, x)
        main, side = self.body(x), self.shortcut(x)
        if main.shape != side.shape or main.dtype != side.dtype:
            raise ValueError(f"Residual: the body gives {shape_text(main.shape)} {main.dtype} "
                             f"but the shortcut {shape_text(side.shape)} {side.dtype} for "
                             f"input {shape_text(np.shape(x))}; they must match to be added")
        out = add_into(self._output_array(main.shape, main.dtype), main, side)
        self._save_for_backward(out.shape, out.dtype)
        return out

    def backward(self, grad_output, input_grad=True):
        shape, dtype = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, shape, dtype)
        grad_body = self.body.backward(grad_output, input_grad)
        grad_side = self.shortcut.backward(grad_output, input_grad)
        if not input_grad:
            return None
        return add_into(self._grad_input_array(grad_body.shape, grad_body.dtype), grad_body,
                        grad_side)


class Concat(Module):
    """y = the branches' outputs side by side along the channels (axis 1), in order.

    Every branch gets the same input; their outputs must agree in every axis but
    the channels.  Backward: each branch gets its slice of dy, and their input
    gradients are summed.  Branches are named "0", "1", ... (keys "0.weight" ...).
    """

    def __init__(self, *branches):
        super().__init__()
        if not branches:
            raise ValueError("Concat: expected at least one branch")
        for i, branch in enumerate(branches):
            if not isinstance(branch, Module):
                raise TypeError(f"Concat: expected a Module as branch {i}, "
                                f"got {type(branch).__name__}")
            self._modules[str(i)] = branch

    def output_shape(self, input_shape):
        shapes = []
        for branch in self._modules.values():
            with naming_errors(branch):
                shapes.append(branch.output_shape(input_shape))
        _check_side_by_side(shapes)
        return (shapes[0][0], sum(s[1] for s in shapes)) + tuple(shapes[0][2:])

    def forward(self, x):
        _check_before_running(self, x)
        outputs = [branch(x) for branch in self._modules.values()]
        _check_side_by_side([out.shape for out in outputs], [out.dtype for out in outputs])
        first = outputs[0]
        channels = [out.shape[1] for out in outputs]
        out = self._output_array((first.shape[0], sum(channels)) + first.shape[2:], first.dtype)
        np.concatenate(outputs, axis=1, out=out)
        self._save_for_backward(out.shape, out.dtype, channels)
        return out

    def backward(self, grad_output, input_grad=True):
        shape, dtype, channels = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, shape, dtype)
        grad_input, start = None, 0
        for branch, width in zip(self._modules.values(), channels):
            grad = branch.backward(np.ascontiguousarray(grad_output[:, start:start + width]),
                                   input_grad)
            start += width
            if not input_grad:
                continue
            if grad_input is None:
                grad_input = self._grad_input_array(grad.shape, grad.dtype)
                grad_input[...] = grad
            else:
                grad_input += grad
        return grad_input


def _check_side_by_side(shapes, dtypes=None):
    """ValueError unless the shapes (and dtypes) agree in every axis but the channels."""
    first = tuple(shapes[0])
    for i, shape in enumerate(shapes):
        shape = tuple(shape)
        if len(shape) < 2 or shape[:1] + shape[2:] != first[:1] + first[2:] or \
                (dtypes is not None and dtypes[i] != dtypes[0]):
            kinds = ("", "") if dtypes is None else (f" {dtypes[0]}", f" {dtypes[i]}")
            raise ValueError(
                "Concat: branch outputs must agree in every axis but the channels (1), got "
                f"{shape_text(first)}{kinds[0]} from branch 0 and {shape_text(shape)}{kinds[1]} "
                f"from branch {i}")


def _check_before_running(container, x):
    """Raise the shape error of ``container`` before any branch runs (so that no
    running statistics move); skipped when a branch cannot tell its output shape."""
    try:
        container.output_shape(np.shape(x))
    except NotImplementedError:
        pass
