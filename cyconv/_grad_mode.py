"""Gradient mode: ``with cyconv.no_grad():`` makes layers keep nothing for backward."""
import functools
import threading

_state = threading.local()


def is_grad_enabled():
    """False inside a ``no_grad`` block (of this thread)."""
    return getattr(_state, "enabled", True)


class _GradMode:
    """Context manager (and decorator) that sets the grad mode of this thread."""

    enabled = True

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.enabled = self.enabled
        return self

    def __exit__(self, *exc_info):
        _state.enabled = self._previous
        return False

    def __call__(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with type(self)():
                return function(*args, **kwargs)
        return wrapper


class no_grad(_GradMode):
    """For inference: inside it, layers do not save inputs, im2col columns or pooling
    indices for backward, so evaluation and prediction use less memory and time;
    calling backward afterwards raises RuntimeError."""

    enabled = False


class enable_grad(_GradMode):
    """Grad mode on inside, even within a ``no_grad`` block (Grad-CAM needs backward)."""

    enabled = True
