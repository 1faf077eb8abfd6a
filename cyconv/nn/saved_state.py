"""One forward, one backward: the state a layer keeps between its forward and its
backward, and the checks that refuse a backward cyconv cannot answer right.

A forward in grad mode keeps what its backward needs (``_save_for_backward``); the
backward uses it once (``_saved_for_backward``).  At a top-level backward, before any
gradient changes, cyconv refuses a backward after two forwards (which one was
meant?) and a backward through a module that ran twice in one forward; the first
layer a second backward reaches refuses it (nothing saved).  Every ``backward`` a
subclass defines is wrapped, when the class is created, by these checks and by the
backward hooks (``Module`` keeps the hooks).
"""
import functools

from cyconv._grad_mode import is_grad_enabled
from cyconv.nn.calls import NamingErrors, Nested, calls


class SavedState:
    """The saved-state half of Module (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if backward is not None and not getattr(backward, "_cyconv_tracked", False):
            cls.backward = _tracked_backward(backward)

    def _init_saved_state(self):
        self.__dict__.update(
            _saved=None,              # what backward needs, set by forward
            _saved_generation=0,      # the top-level forward that set it
            _saved_status="never",    # why _saved is None: never, no_grad, used, discarded
            _saves_in_generation=0,   # forwards of this module in that top-level forward
            _forwards_pending=0,      # top-level forwards not yet backpropagated
            _in_backward=False)

    def _save_for_backward(self, *values):
        if not is_grad_enabled():
            self.__dict__.update(_saved=None, _saved_status="no_grad")
            return
        generation = calls.generation
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


def _tracked_backward(backward):
    """Wrap a subclass's backward: checks at the top level, backward hooks, reuse."""

    @functools.wraps(backward)
    def tracked(self, grad_output, input_grad=True):
        if self._in_backward:   # a subclass calling super().backward(...)
            return backward(self, grad_output, input_grad)
        with Nested() as depth, NamingErrors(self, depth == 1):
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
