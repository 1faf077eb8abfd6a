"""The layer contract shared by every layer, the optimizers and the trainer.

A layer (Module) has
    forward(x) -> y           (also layer(x)); in grad mode it keeps what backward needs
    backward(dy) -> dx        dx = dL/dx for dy = dL/dy; parameter gradients ACCUMULATE
                              into Parameter.grad (zero them with zero_grad())
    parameters()              its Parameters (weight before bias, as PyTorch orders them)
    train() / eval()          the mode (BatchNorm and Dropout behave differently)
    state_dict() / load_state_dict(sd)   PyTorch's keys and layouts
"""
from collections import OrderedDict

import numpy as np

from cyconv._checks import shape_text
from cyconv._grad_mode import is_grad_enabled


class Parameter:
    """A trainable array and its gradient (same shape and dtype)."""

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = np.ascontiguousarray(data)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class of all layers (see the module docstring for the contract)."""

    def __init__(self):
        self.training = True
        self._parameters = OrderedDict()   # name -> Parameter, in PyTorch's order
        self._buffers = OrderedDict()      # name -> ndarray (running statistics)
        self._saved = None                 # what backward needs, set by forward
        self._workspaces = {}              # name -> scratch array reused across steps
        # Set by Sequential: this layer's output (or input gradient) only feeds
        # the next layer, so its array may be reused from call to call.
        self._intermediate_output = False
        self._intermediate_grad = False

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_output, input_grad=True):
        """grad wrt the input (None when input_grad is False); accumulates parameter grads."""
        raise NotImplementedError

    # -- what forward keeps for backward -------------------------------------------
    def _save_for_backward(self, *values):
        self._saved = values if is_grad_enabled() else None

    def _saved_for_backward(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward "
                               "(or the forward ran under cyconv.no_grad())")
        return self._saved

    def _workspace(self, name, shape, dtype):
        """A scratch array kept between calls (reallocated only when the shape changes)."""
        array = self._workspaces.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != dtype:
            array = np.empty(shape, dtype)
            self._workspaces[name] = array
        return array

    def _output_array(self, shape, dtype):
        """The array for this call's output: reused when only the next layer reads it.

        Reusing the arrays of intermediate activations spares the allocator and
        the page faults of fresh memory at every step (tens of MB per layer).
        """
        if self._intermediate_output:
            return self._workspace("output", shape, dtype)
        return np.empty(shape, dtype)

    def _grad_input_array(self, shape, dtype):
        """The array for this call's input gradient (reused inside a Sequential)."""
        if self._intermediate_grad:
            return self._workspace("grad_input", shape, dtype)
        return np.empty(shape, dtype)

    def _can_absorb(self, next_layer):
        """True when this layer can also compute next_layer's forward (and its mask in
        backward) in its own kernels; Sequential then calls _forward(x, True) here
        and next_layer._absorb(output)."""
        return False

    # -- parameters, modes, state ------------------------------------------------
    def children(self):
        """(name, sub-layer) pairs; a plain layer has none."""
        return []

    def named_parameters(self, prefix=""):
        for name, param in self._parameters.items():
            yield prefix + name, param
        for child_name, child in self.children():
            yield from child.named_parameters(f"{prefix}{child_name}.")

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name, buffer in self._buffers.items():
            yield prefix + name, buffer
        for child_name, child in self.children():
            yield from child.named_buffers(f"{prefix}{child_name}.")

    def zero_grad(self):
        for param in self.parameters():
            param.grad[...] = 0

    def train(self, mode=True):
        self.training = bool(mode)
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """OrderedDict of copies: parameters then buffers of each layer, PyTorch's keys."""
        state = OrderedDict()
        self._collect_state(state, "")
        return state

    def _collect_state(self, state, prefix):
        for name, param in self._parameters.items():
            state[prefix + name] = param.data.copy()
        for name, buffer in self._buffers.items():
            state[prefix + name] = buffer.copy()
        for child_name, child in self.children():
            child._collect_state(state, f"{prefix}{child_name}.")

    def _state_targets(self, prefix=""):
        """(key, the array that holds it) for every entry of state_dict()."""
        for name, param in self._parameters.items():
            yield prefix + name, param.data
        for name, buffer in self._buffers.items():
            yield prefix + name, buffer
        for child_name, child in self.children():
            yield from child._state_targets(f"{prefix}{child_name}.")

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of state_dict in place; every key, shape and value is checked first.

        Values may be numpy arrays or anything with a ``.numpy()`` (PyTorch tensors).
        Nothing is changed when an error is raised.
        """
        targets = OrderedDict(self._state_targets())
        missing = [key for key in targets if key not in state_dict]
        unexpected = [key for key in state_dict if key not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        staged = []
        for key, target in targets.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
            if value.shape != target.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{key}' expected shape "
                                 f"{shape_text(target.shape)}, got {shape_text(value.shape)}")
            if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
                raise TypeError(f"{type(self).__name__}.load_state_dict: '{key}' expected dtype "
                                f"{target.dtype}, got {value.dtype}")
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{key}' "
                                 "contains NaN or inf")
            staged.append((target, value))
        for target, value in staged:
            target[...] = value
        return missing, unexpected

    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class Sequential(Module):
    """Layers applied in order; state_dict keys are "<index>.<name>" like PyTorch's."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: expected a Module at position {i}, "
                                f"got {type(layer).__name__}")
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def forward(self, x):
        """Every layer in turn.

        The arrays between layers are reused from call to call (the returned
        output is always a fresh array), and a layer followed by one it can
        absorb (Conv2d then ReLU) runs both in one kernel pass; the layers and
        their state_dict keys stay as written.
        """
        last = len(self.layers) - 1
        i = 0
        try:
            while i <= last:
                layer = self.layers[i]
                if i < last and layer._can_absorb(self.layers[i + 1]):
                    layer._intermediate_output = i + 1 < last
                    x = self.layers[i + 1]._absorb(layer._forward(x, True))
                    i += 2
                else:
                    layer._intermediate_output = i < last
                    x = layer(x)
                    i += 1
        finally:  # a layer called on its own afterwards returns fresh arrays again
            for layer in self.layers:
                layer._intermediate_output = False
        return x

    def backward(self, grad_output, input_grad=True):
        """Back through every layer; input_grad=False skips the first layer's input gradient.

        The gradients between layers live in reused arrays; the returned input
        gradient is always a fresh array.
        """
        if not self.layers:
            return grad_output
        try:
            for i in range(len(self.layers) - 1, 0, -1):
                self.layers[i]._intermediate_grad = True
                grad_output = self.layers[i].backward(grad_output)
        finally:  # a layer called on its own afterwards returns fresh arrays again
            for layer in self.layers:
                layer._intermediate_grad = False
        return self.layers[0].backward(grad_output, input_grad=input_grad)

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
