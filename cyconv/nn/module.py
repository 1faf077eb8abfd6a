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
import functools
import itertools
import threading
from collections import OrderedDict

import numpy as np

from cyconv._checks import shape_text
from cyconv._grad_mode import is_grad_enabled
from cyconv.nn.array_pool import end_top_level_call, reusable_array


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


class RemovableHandle:
    """What register_*_hook returns: ``handle.remove()`` unregisters the hook."""

    _ids = itertools.count()

    def __init__(self, hooks):
        self._hooks, self.id = hooks, next(self._ids)

    def remove(self):
        self._hooks.pop(self.id, None)


class _CallState(threading.local):
    """Per thread: how deep in nested module calls we are, and the number of the
    current top-level call."""

    def __init__(self):
        self.depth = 0
        self.generation = 0


_calls = _CallState()
_generations = itertools.count(1)


class _Nested:
    """Context of one module call: depth + 1 inside; the end of a top-level call
    (depth 1) lets the array pool forget arrays that sat idle."""

    def __enter__(self):
        _calls.depth += 1
        return _calls.depth

    def __exit__(self, *exc_info):
        _calls.depth -= 1
        if _calls.depth == 0:
            end_top_level_call()
        return False


def naming_errors(module):
    """Context: an error raised inside is attributed to ``module`` (unless a module deeper
    inside claimed it), so that the top-level call names its path.  Containers use it
    around the output_shape of their children."""
    return _NamingErrors(module, False)


class _NamingErrors:
    """An error raised inside a model names the module it came from: the innermost
    module is noted on the way out, and the top-level call prefixes its dotted name
    ("layer1.0.conv1: Conv2d: expected ...")."""

    def __init__(self, module, top):
        self.module, self.top = module, top

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not isinstance(error, (ValueError, TypeError, RuntimeError, IndexError)):
            return False
        origin = error.__dict__.setdefault("_cyconv_module", self.module)
        if self.top and origin is not self.module and error.args:
            path = next((name for name, m in self.module.named_modules() if m is origin), None)
            if path:
                error.args = (f"{path}: {error.args[0]}",) + error.args[1:]
        return False


def _tracked_backward(backward):
    """Wrap a subclass's backward: checks at the top level, backward hooks, reuse."""

    @functools.wraps(backward)
    def tracked(self, grad_output, input_grad=True):
        if self._in_backward:   # a subclass calling super().backward(...)
            return backward(self, grad_output, input_grad)
        with _Nested() as depth, _NamingErrors(self, depth == 1):
            try:
                if depth == 1:
                    self._check_backward_allowed()
                grad_input = self._backward_with_hooks(backward, grad_output, input_grad)
            finally:
                if depth == 1:   # the forwards before this backward are settled either way
                    self.__dict__["_forwards_pending"] = 0
        return grad_input

    tracked._cyconv_tracked = True
    return tracked


class Module:
    """Base class of all layers and containers (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if backward is not None and not getattr(backward, "_cyconv_tracked", False):
            cls.backward = _tracked_backward(backward)

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
        d["_saved"] = None                 # what backward needs, set by forward
        d["_saved_generation"] = 0         # the top-level forward that set it
        d["_saved_status"] = "never"       # why _saved is None: never, no_grad, used
        d["_saves_in_generation"] = 0      # forwards of this module in that top-level forward
        d["_forwards_pending"] = 0         # top-level forwards not yet backpropagated
        d["_in_backward"] = False

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
        top = _calls.depth == 0
        if top:
            _calls.generation = next(_generations)
        with _Nested(), _NamingErrors(self, top):
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

    # -- what forward keeps for backward ------------------------------------------
    def _save_for_backward(self, *values):
        if not is_grad_enabled():
            self.__dict__.update(_saved=None, _saved_status="no_grad")
            return
        generation = _calls.generation
        same = generation == self._saved_generation and self._saved is not None
        self.__dict__.update(_saved=values, _saved_generation=generation,
                             _saves_in_generation=self._saves_in_generation + 1 if same else 1)

    def _saved_for_backward(self):
        """The state the last forward kept (cleared once backward succeeds)."""
        if self._saved is None:
            raise RuntimeError(self._no_saved_state_message())
        if self._saves_in_generation > 1:
            raise RuntimeError(
                f"{type(self).__name__}.backward: this module ran {self._saves_in_generation} "
                "times in one forward, and it keeps the state of one call only; a module may "
                "appear at one place of a model (use one instance per place)")
        return self._saved

    def _no_saved_state_message(self):
        where = type(self).__name__ + ".backward"
        return {
            "never": f"{where} called before forward",
            "no_grad": f"{where}: the last forward ran under cyconv.no_grad(), which keeps "
                       "nothing for backward",
            "used": f"{where} called twice for one forward: the first backward used the "
                    "state that forward kept (run forward again)",
            "discarded": f"{where}: the state of the last forward was discarded (by "
                         "discard_saved() or a refused backward); run forward again",
        }[self._saved_status]

    def _backward_with_hooks(self, backward, grad_output, input_grad):
        """The subclass's backward between the backward pre-hooks and hooks; marks the state
        of the forward as used."""
        for hook in list(self._backward_pre_hooks.values()):
            result = hook(self, (grad_output,))
            if result is not None:
                grad_output = result[0] if isinstance(result, tuple) else result
        self.__dict__["_in_backward"] = True
        try:
            grad_input = backward(self, grad_output, input_grad)
        finally:
            self.__dict__["_in_backward"] = False
        if self._saved is not None:   # used: a second backward must raise
            self.__dict__.update(_saved=None, _saved_status="used")
        for hook in list(self._backward_hooks.values()):
            result = hook(self, (grad_input,), (grad_output,))
            if result is not None:
                grad_input = result[0] if isinstance(result, tuple) else result
        return grad_input

    def _check_backward_allowed(self):
        """At a top-level backward, before any gradient changes: refuse a backward after
        two forwards, or through a module that ran twice in one forward.  (A second
        backward is refused by the first layer it reaches, which has nothing saved.)"""
        if self._forwards_pending > 1:
            count = self._forwards_pending
            self.discard_saved()
            raise RuntimeError(
                f"{type(self).__name__}.backward: forward ran {count} times in grad mode since "
                "the last backward, and cyconv keeps the state of the last one only, so it "
                "cannot tell which forward this gradient belongs to; run the forwards you do "
                "not backpropagate under cyconv.no_grad()")
        for module in self.modules():
            if module._saved is not None and module._saves_in_generation > 1:
                module._saved_for_backward()   # raises with the module's own message

    def discard_saved(self):
        """Forget what the last forward kept for backward (frees its memory), in every
        sub-module; the next backward must follow a new forward."""
        for module in self.modules():
            if module._saved is not None:
                module.__dict__.update(_saved=None, _saved_status="discarded")
            module.__dict__["_forwards_pending"] = 0

    # -- arrays ------------------------------------------------------------------------
    def _workspace(self, name, shape, dtype):
        """A scratch array of this module's kernels, kept between calls (reallocated only
        when the shape changes)."""
        array = self._workspaces.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != dtype:
            array = np.empty(shape, dtype)
            self._workspaces[name] = array
        return array

    def _output_array(self, shape, dtype):
        """The array for this call's output (from the pool: see the module docstring)."""
        return reusable_array(shape, dtype)

    def _grad_input_array(self, shape, dtype):
        """The array for this call's input gradient (from the pool)."""
        return reusable_array(shape, dtype)

    def _can_absorb(self, next_layer):
        """True when this layer can also compute next_layer's forward (and its mask in
        backward) in its own kernels; a container then calls ``_forward(x, True)`` here
        and ``next_layer._absorb(output)``."""
        return False

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
                value = _as_numpy(state_dict[key])
                _check_state_value(where, key, value, target)
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


def _as_numpy(value):
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def _check_state_value(where, key, value, target):
    """ValueError/TypeError unless value fits target: shape, dtype kind, finite in its dtype."""
    if value.shape != target.shape:
        raise ValueError(f"{where}: '{key}' expected shape {shape_text(target.shape)}, "
                         f"got {shape_text(value.shape)}")
    if not np.can_cast(value.dtype, target.dtype, casting="same_kind"):
        raise TypeError(f"{where}: '{key}' expected dtype {target.dtype}, got {value.dtype}")
    if target.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(target.dtype)
        if not np.all(np.isfinite(cast)):
            what = ("contains NaN or inf" if not np.all(np.isfinite(value)) else
                    f"has values beyond the range of {target.dtype} (they would become inf)")
            raise ValueError(f"{where}: '{key}' {what}")
    elif target.dtype.kind in "iu" and value.size and (
            value.min() < np.iinfo(target.dtype).min or value.max() > np.iinfo(target.dtype).max):
        raise ValueError(f"{where}: '{key}' has values beyond the range of {target.dtype}")
