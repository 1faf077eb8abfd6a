"""The layer contract shared by every layer, container, optimizer and the trainer.

A layer (Module) has
    layer(x) -> y             runs forward(x) and the forward hooks; in grad mode the
                              layer keeps what backward needs
    backward(dy) -> dx        dx = dL/dx for dy = dL/dy; parameter gradients ACCUMULATE
                              into Parameter.grad (zero them with zero_grad())
    named_parameters(), parameters(), named_buffers(), named_children(),
    named_modules()           PyTorch's names and order ("layer1.0.conv1.weight")
    train() / eval()          the mode (BatchNorm and Dropout behave differently)
    state_dict() / load_state_dict(sd)   PyTorch's keys and layouts
    register_forward_hook(h), register_full_backward_hook(h) and their _pre_ forms:
                              PyTorch's hooks

Sub-modules and Parameters assigned as attributes (``self.conv1 = Conv2d(...)``)
are registered in the order they were assigned, as in PyTorch.

One forward, one backward.  A forward in grad mode keeps the state its backward
needs; that backward must come before the next forward in grad mode and can
run once.  A second backward, or a backward after two forwards (cyconv keeps
the state of one forward, so it cannot tell which one was meant), raises
RuntimeError before any gradient changes.  Run the forwards you do not
backpropagate under ``cyconv.no_grad()``.  For the same reason a module may
appear at one place of a model only.

Arrays.  A layer writes its output and its input gradient into arrays that it
takes from a pool (:mod:`cyconv.nn.array_pool`) and that come back to the pool
once nothing refers to them: steps after the first allocate no fresh memory, and
an array you keep is never overwritten.

Subclasses implement ``forward(x)`` and ``backward(grad_output, input_grad=True)``
(``input_grad=False``: return None, only parameter gradients are wanted).
Every ``backward`` a subclass defines is wrapped once, when the class is
created (``__init_subclass__``), by the bookkeeping above and the backward hooks.
"""
import math
from collections import OrderedDict

import numpy as np

from cyconv._grad_mode import is_grad_enabled
from cyconv.nn.array_pool import reusable_array
from cyconv.nn.calls import NamingErrors, Nested, RemovableHandle, calls, generations, naming_errors
from cyconv.nn.parameter import Parameter
from cyconv.nn.saved_state import SavedState
from cyconv.nn.state import as_numpy, check_state_value

__all__ = ["Module", "Parameter", "RemovableHandle", "naming_errors"]


class Module(SavedState):
    """Base class of all layers and containers (see the module docstring)."""

    def __init__(self):
        d = self.__dict__
        d["training"] = True
        d["_parameters"] = OrderedDict()   # name -> Parameter (or None), assignment order
        d["_buffers"] = OrderedDict()      # name -> ndarray (running statistics)
        d["_modules"] = OrderedDict()      # name -> sub-module, assignment order
        d["_forward_pre_hooks"] = OrderedDict()
        d["_forward_hooks"] = OrderedDict()
        d["_backward_pre_hooks"] = OrderedDict()
        d["_backward_hooks"] = OrderedDict()
        d["_workspaces"] = {}              # name -> scratch array reused across calls
        self._init_saved_state()

    # -- registration -------------------------------------------------------------
    def __setattr__(self, name, value):
        d = self.__dict__
        if "_modules" not in d:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before "
                                 f"assigning {name!r}")
        parameters, modules, buffers = d["_parameters"], d["_modules"], d["_buffers"]
        if isinstance(value, Parameter):    # a name assigned again keeps its place
            modules.pop(name, None)
            parameters[name] = value
        elif isinstance(value, Module):
            parameters.pop(name, None)
            modules[name] = value
        elif name in buffers and value is not None:
            buffers[name] = value
        else:
            for registry in (parameters, modules, buffers):
                registry.pop(name, None)
        d[name] = value

    def __delattr__(self, name):
        for registry in ("_parameters", "_buffers", "_modules"):
            self.__dict__[registry].pop(name, None)
        del self.__dict__[name]

    def register_buffer(self, name, array):
        """A state array that is not trained (running statistics): in state_dict, not in
        parameters()."""
        self.__dict__["_buffers"][name] = array
        self.__dict__[name] = array

    # -- calling ------------------------------------------------------------------
    def __call__(self, x):
        top = calls.depth == 0
        if top:
            calls.generation = next(generations)
        with Nested(), NamingErrors(self, top):
            for hook in list(self._forward_pre_hooks.values()):
                result = hook(self, (x,))
                if result is not None:
                    x = result[0] if isinstance(result, tuple) else result
            out = self.forward(x)
            for hook in list(self._forward_hooks.values()):
                result = hook(self, (x,), out)
                if result is not None:
                    out = result
        if top and is_grad_enabled():
            self.__dict__["_forwards_pending"] += 1
        return out

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_output, input_grad=True):
        """grad wrt the input (None when input_grad is False); accumulates parameter grads."""
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def output_shape(self, input_shape):
        """The shape of forward's output for an input of ``input_shape``, without running it
        (ValueError, as forward would raise, for a shape the module does not take)."""
        raise NotImplementedError(f"{type(self).__name__} does not define output_shape")

    def register_forward_pre_hook(self, hook):
        """``hook(module, inputs)`` before every forward; a non-None return value replaces
        the input.  ``inputs`` is a 1-tuple, as in PyTorch."""
        return self._add_hook(self._forward_pre_hooks, hook)

    def register_full_backward_pre_hook(self, hook):
        """``hook(module, grad_output)`` before every backward; a non-None return value
        replaces grad_output (1-tuples, as in PyTorch)."""
        return self._add_hook(self._backward_pre_hooks, hook)

    @staticmethod
    def _add_hook(hooks, hook):
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def register_forward_hook(self, hook):
        """``hook(module, inputs, output)`` after every forward; a non-None return value
        replaces the output.  ``inputs`` is a 1-tuple, as in PyTorch."""
        return self._add_hook(self._forward_hooks, hook)

    def register_full_backward_hook(self, hook):
        """``hook(module, grad_input, grad_output)`` after every backward (1-tuples; the
        gradient is None when input_grad=False); a non-None return value replaces
        grad_input.  After it runs, this module's parameter gradients are final."""
        return self._add_hook(self._backward_hooks, hook)

    def _hooked(self):
        """True when a hook watches this module (it then runs alone, never fused)."""
        return bool(self._forward_pre_hooks or self._forward_hooks or
                    self._backward_pre_hooks or self._backward_hooks)

    # -- arrays ------------------------------------------------------------------------
    def _workspace(self, name, shape, dtype):
        """A scratch array of this module's kernels, kept between calls (reallocated only
        when the shape changes)."""
        array = self._workspaces.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != dtype:
            array = np.empty(shape, dtype)
            self._workspaces[name] = array
        return array

    def _scratch(self, shape, dtype):
        """A scratch array for one kernel call only, from the pool: a view of a flat array
        whose length is rounded up to a power of two, so that all layers share a few
        large arrays instead of each keeping its own.  Uninitialised."""
        size = math.prod(shape)   # (np.prod cost more than the rest of the call)
        flat = reusable_array((1 << max(size - 1, 0).bit_length(),), dtype)
        return flat[:size].reshape(shape)

    def _output_array(self, shape, dtype):
        """The array for this call's output (from the pool: see the module docstring)."""
        return reusable_array(shape, dtype)

    def _grad_input_array(self, shape, dtype):
        """The array for this call's input gradient (from the pool)."""
        return reusable_array(shape, dtype)

    def _can_absorb(self, next_layer):
        """True when this layer can also compute next_layer's forward (and its mask in
        backward) in its own kernels; a container then calls
        ``_forward_absorbing(x, [next_layer])`` here and ``next_layer._absorb(output)``."""
        return False

    def _can_absorb_second(self, first, second):
        """True when this layer, having absorbed ``first``, can also compute the layer after
        it (then ``_forward_absorbing(x, [first, second])``, and each of the two gets
        ``_absorb(output)``)."""
        return False

    def _folds_into(self, conv):
        """True when the Conv2d ``conv`` before this layer can apply it through its weight
        and bias (``_folded``), and will (see Conv2d._forward_absorbing)."""
        return False

    def _forward_absorbing(self, x, absorbed):
        """forward(x) followed by the forwards of the absorbed layers, in this layer's
        kernels (defined by each layer whose ``_can_absorb`` can say yes)."""
        raise NotImplementedError(f"{type(self).__name__} absorbs no layer")

    # -- the tree -------------------------------------------------------------------
    def named_children(self):
        """(name, sub-module) pairs in registration order."""
        return [(name, m) for name, m in self._modules.items() if m is not None]

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix=""):
        """(dotted name, module) of this module ("") and every sub-module, in pre-order."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def get_submodule(self, target):
        """The sub-module at a dotted name ("layer4.1.conv2"); "" is the module itself."""
        module = self
        for part in filter(None, str(target).split(".")):
            child = module._modules.get(part)
            if child is None:
                names = [name for name, _ in self.named_modules() if name]
                raise KeyError(f"{type(self).__name__} has no sub-module {target!r}; its "
                               f"sub-modules are {names[:20]}{' ...' if len(names) > 20 else ''}")
            module = child
        return module

    def set_submodule(self, target, module):
        """Replace the sub-module at a dotted name (e.g. a BatchNorm2d by a SyncBatchNorm)."""
        parent_name, _, name = str(target).rpartition(".")
        parent = self.get_submodule(parent_name)
        if name not in parent._modules:
            raise KeyError(f"{type(parent).__name__} has no sub-module {name!r}")
        parent._set_child(name, module)

    def _set_child(self, name, module):
        setattr(self, name, module)

    def named_parameters(self, prefix=""):
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if param is not None:
                    yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for module_name, module in self.named_modules(prefix):
            for name, buffer in module._buffers.items():
                yield (f"{module_name}.{name}" if module_name else name), buffer

    def zero_grad(self):
        for param in self.parameters():
            param.grad[...] = 0

    def train(self, mode=True):
        for module in self.modules():
            module.__dict__["training"] = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- state --------------------------------------------------------------------
    def _state_targets(self):
        """(key, the array that holds it) for every entry of state_dict(): each module's
        parameters, then its buffers, then its children's (PyTorch's order)."""
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is not None:
                    yield prefix + name, param.data, module
            for name, buffer in module._buffers.items():
                yield prefix + name, buffer, module

    def state_dict(self, keep_vars=False):
        """OrderedDict of copies of every parameter and buffer, under PyTorch's keys;
        ``keep_vars=True``: the arrays themselves, to update in place (as PyTorch's)."""
        return OrderedDict((key, array if keep_vars else array.copy())
                           for key, array, _ in self._state_targets())

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of state_dict in place; every key, shape and value is checked first.

        Values may be numpy arrays or anything with a ``.numpy()`` (PyTorch tensors).
        Nothing is changed when an error is raised.  Returns (missing, unexpected) keys
        (both empty when strict).
        """
        where = f"{type(self).__name__}.load_state_dict"
        targets = OrderedDict((key, (array, module))
                              for key, array, module in self._state_targets())
        missing = [key for key in targets if key not in state_dict]
        unexpected = [key for key in state_dict if key not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        staged = []
        for key, (target, module) in targets.items():
            if key in state_dict:
                value = as_numpy(state_dict[key])
                check_state_value(where, key, value, target)
                problem = module._state_problem(key.rpartition(".")[2], value)
                if problem:
                    raise ValueError(f"{where}: '{key}' {problem}")
                staged.append((target, value))
        for target, value in staged:
            target[...] = value
        return missing, unexpected

    def _state_problem(self, name, value):
        """Why ``value`` cannot be this module's state entry ``name`` (None: it can)."""
        return None

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = self.named_children()
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "\n".join(f"  ({name}): " + repr(child).replace("\n", "\n  ")
                          for name, child in children)
        return f"{type(self).__name__}(\n{inner}\n)"


