"""Gradient mode: ``with cyconv.no_grad():`` makes layers keep nothing for backward."""
import functools
import threading

_state = threading.local()


def is_grad_enabled():
    """False inside a ``no_grad`` block (of this thread)."""
    return getattr(_state, "enabled", True)


class no_grad:
    """Context manager (and decorator) for inference.

    Inside it, layers do not save inputs, im2col columns or pooling indices for
    backward, so evaluation and prediction use less memory and time; calling
    backward afterwards raises RuntimeError.
    """

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.enabled = False
        return self

    def __exit__(self, *exc_info):
        _state.enabled = self._previous
        return False

    def __call__(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with no_grad():
                return function(*args, **kwargs)
        return wrapper
