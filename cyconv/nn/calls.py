"""The bookkeeping around module calls: how deep in nested calls a thread is, which
top-level forward is running, errors that name the module they came from, and the
wrapper that every subclass's backward gets (hooks, the one-forward-one-backward
checks).  See cyconv/nn/module.py."""
import itertools
import threading

from cyconv.nn.array_pool import end_top_level_call


class RemovableHandle:
    """What register_*_hook returns: ``handle.remove()`` unregisters the hook."""

    _ids = itertools.count()

    def __init__(self, hooks):
        self._hooks, self.id = hooks, next(self._ids)

    def remove(self):
        self._hooks.pop(self.id, None)


class CallState(threading.local):
    """Per thread: how deep in nested module calls we are, and the number of the
    current top-level call."""

    def __init__(self):
        self.depth = 0
        self.generation = 0


calls = CallState()
generations = itertools.count(1)


class Nested:
    """Context of one module call: depth + 1 inside; the end of a top-level call
    (depth 1) lets the array pool forget arrays that sat idle."""

    def __enter__(self):
        calls.depth += 1
        return calls.depth

    def __exit__(self, *exc_info):
        calls.depth -= 1
        if calls.depth == 0:
            end_top_level_call()
        return False


def naming_errors(module):
    """Context: an error raised inside is attributed to ``module`` (unless a module deeper
    inside claimed it), so that the top-level call names its path.  Containers use it
    around the output_shape of their children."""
    return NamingErrors(module, False)


class NamingErrors:
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
