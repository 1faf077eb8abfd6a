"""Time and speed of every layer of a model: ``cyconv.profile(model, input_shape)``.

Each leaf module (one without sub-modules) is timed through the public hooks
(forward pre-hook and forward hook, full backward pre-hook and full backward hook)
over a few training steps: forward of a random input, backward of a random output
gradient (the first layer computes no input gradient, as in training).
Convolutions and Linear layers are counted in FLOPs (2 per multiply-add of the
direct computation; bias not counted) and compared with the GEMM peak measured in
the same call (numpy's product of two 2048 x 2048 matrices on as many threads,
the better of one measurement before and one after the steps);
the other layers are memory-bound and shown in GB/s of their input and output
arrays, each counted once (a lower bound on what they move).

Hooks make every layer run alone: inside containers a Conv2d or BatchNorm2d is then
no longer fused with the activation (and max-pool) after it.  So the model's own step,
without hooks, is timed too (alternating with the profiled one) and reported beside it.

Profiling leaves the model as it was: parameters, gradients, buffers (BatchNorm's
running statistics), Dropout's call counters and train/eval modes are restored.
A forward not yet backpropagated when profiling starts is forgotten, and the layers'
scratch arrays (workspaces, the array pool) stay allocated at the profiled size.

Command line (one line per error; ``--help`` for every option)::

    python -m cyconv.profile_cli --model small --batch 32 --image-size 128 --threads 2
    python -m cyconv.profile_cli --model runs/best.safetensors --batch 8 --inference
"""
import contextlib
import math
import statistics
import time

import numpy as np

from cyconv._grad_mode import enable_grad, no_grad
from cyconv._profile_report import LayerProfile, Pass, Profile
from cyconv._threads import get_num_threads, set_num_threads
from cyconv.nn import Conv2d, Dropout, Linear, Module

FUSION_NOTE = ("hooks run every layer alone, so Conv2d/BatchNorm2d + ReLU (BatchNorm2d + "
               "ReLU6, BatchNorm2d + ReLU + MaxPool2d) are not fused here as they are inside "
               "containers")


def gemm_peak(threads=None, dtype=np.float32, size=2048, repeats=3):
    """GFLOP/s of numpy's product of two ``size`` x ``size`` matrices on ``threads``
    threads (default: cyconv's thread count): the best of ``repeats`` after a warm-up."""
    from threadpoolctl import threadpool_limits
    threads = get_num_threads() if threads is None else threads
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)
        best = min(_seconds(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(task):
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def layer_flops(module, input_shape, output_shape, input_grad=True):
    """(forward, backward) FLOPs of a Conv2d or Linear, 2 per multiply-add, bias not
    counted; backward = the weight gradient, plus the input gradient when
    ``input_grad``.  None for other layers (memory-bound)."""
    if isinstance(module, Conv2d):
        kh, kw = module.kernel_size
        taps = module.in_channels // module.groups * kh * kw
    elif isinstance(module, Linear):
        taps = module.in_features
    else:
        return None
    forward = 2 * math.prod(output_shape) * taps
    return forward, forward * (2 if input_grad else 1)


def layer_bytes(input_shape, output_shape, itemsize, input_grad=True):
    """(forward, backward) bytes of a memory-bound layer: its input and output arrays
    (backward: the output's and, when ``input_grad``, the input's gradient), each once."""
    x, y = math.prod(input_shape) * itemsize, math.prod(output_shape) * itemsize
    return x + y, y + (x if input_grad else 0)


class _LayerTimer:
    """Hooks on every leaf module that time its forward and backward calls.

    Per leaf (by id): the shapes and dtype of its first call, whether its output is a
    view of its input, whether backward made an input gradient, and the seconds of
    every call made while ``recording``.
    """

    def __init__(self, model):
        self.leaves = {id(m): (name, m) for name, m in model.named_modules()
                       if not m.named_children()}
        self.order = []                      # leaf ids in the order of their first forward
        self.calls = {}                      # leaf id -> dict of what its calls showed
        self.seconds = {"forward": {}, "backward": {}}   # direction -> leaf id -> [s]
        self.step_leaf_seconds = 0.0         # leaf time of the current step
        self.recording = False
        self._started, self._handles = {}, []

    def attach(self):
        for _, module in self.leaves.values():
            self._handles += [module.register_forward_pre_hook(self._start),
                              module.register_forward_hook(self._forward_end),
                              module.register_full_backward_pre_hook(self._start),
                              module.register_full_backward_hook(self._backward_end)]

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start(self, module, _):
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module, direction):
        elapsed = time.perf_counter() - self._started.pop(id(module))
        if self.recording:
            self.seconds[direction].setdefault(id(module), []).append(elapsed)
            self.step_leaf_seconds += elapsed

    def _forward_end(self, module, inputs, output):
        self._stop(module, "forward")
        if id(module) not in self.calls:
            self.order.append(id(module))
            self.calls[id(module)] = {
                "input_shape": tuple(np.shape(inputs[0])), "output_shape": tuple(output.shape),
                "itemsize": output.dtype.itemsize, "input_grad": True,
                "view": np.may_share_memory(inputs[0], output)}

    def _backward_end(self, module, grad_input, _):
        self._stop(module, "backward")
        if grad_input[0] is None:
            self.calls[id(module)]["input_grad"] = False


@contextlib.contextmanager
def _thread_count(threads):
    """cyconv's kernels use ``threads`` (None: as they are) inside; the count is restored."""
    before = get_num_threads()
    if threads is not None:
        set_num_threads(threads)
    try:
        yield get_num_threads()
    finally:
        set_num_threads(before)


@contextlib.contextmanager
def _model_restored(model, training):
    """The model in train (``training``) or eval mode inside; afterwards its parameters,
    gradients, buffers, Dropout call counters and modes are as they were."""
    model.discard_saved()
    modes = [(m, m.training) for m in model.modules()]
    state = model.state_dict()
    grads = [(p, p.grad.copy()) for p in model.parameters()]
    dropout_calls = [(m, m.calls) for m in model.modules() if isinstance(m, Dropout)]
    model.train(training)
    try:
        yield
    finally:
        model.discard_saved()
        live = model.state_dict(keep_vars=True)
        for key, value in state.items():
            live[key][...] = value
        for param, grad in grads:
            param.grad[...] = grad
        for module, calls in dropout_calls:
            module.calls = calls
        for module, mode in modes:
            module.training = mode


class _Steps:
    """Training steps (or forwards) of a model on one random input."""

    def __init__(self, model, input_shape, dtype, backward, seed):
        self.model, self.backward = model, backward
        self.rng = np.random.default_rng(seed)
        self.x = self.rng.standard_normal(input_shape).astype(dtype)
        self.grad = None   # a random output gradient, made at the first forward

    def run(self):
        """(forward seconds, backward seconds) of one step (backward 0.0 when there is none)."""
        with enable_grad() if self.backward else no_grad():
            start = time.perf_counter()
            out = self.model(self.x)
            middle = time.perf_counter()
            if not self.backward:
                return middle - start, 0.0
            if self.grad is None or self.grad.shape != out.shape:
                self.grad = self.rng.standard_normal(out.shape).astype(out.dtype)
            self.model.backward(self.grad, input_grad=False)
        return middle - start, time.perf_counter() - middle


def profile(model, input_shape, *, steps=5, warmup=1, threads=None, backward=True, peak=None,
            seed=0, print_table=True):
    """Profile ``model`` on random input of ``input_shape`` (with the batch, e.g.
    (32, 3, 128, 128)) -> a :class:`Profile` (per leaf layer, in execution order:
    milliseconds, FLOPs, GFLOP/s, share of the GEMM peak, GB/s), printed as a table
    unless ``print_table`` is False.

    steps: timed steps (each layer's median is reported) after ``warmup`` steps;
    threads: cyconv's thread count for the call (None: the current one); backward:
    False profiles inference (eval mode, forward only, no_grad); peak: the GEMM
    GFLOP/s to compare with (None: measured now, on ``threads`` threads).
    """
    input_shape = _checked_arguments(model, input_shape, steps, warmup, peak)
    dtype = next((p.dtype for p in model.parameters()), np.dtype(np.float32))
    with _thread_count(threads) as used_threads, _model_restored(model, training=backward):
        # the peak is the better of a measurement before and one after the steps: on a
        # shared machine one of them may be slowed by another process
        peak_gflop_s = gemm_peak(used_threads, dtype) if peak is None else float(peak)
        timer = _LayerTimer(model)
        hooked, plain, outside = _timed_steps(
            timer, _Steps(model, input_shape, dtype, backward, seed), warmup, steps)
        if peak is None:
            peak_gflop_s = max(peak_gflop_s, gemm_peak(used_threads, dtype))
    result = Profile(
        model=type(model).__name__, input_shape=input_shape, dtype=np.dtype(dtype).name,
        threads=used_threads, steps=steps, warmup=warmup, backward=backward,
        peak_gflop_s=peak_gflop_s, peak_measured=peak is None,
        layers=[_layer_profile(timer, leaf, peak_gflop_s) for leaf in timer.order],
        forward_ms=1e3 * statistics.median(f for f, _ in hooked),
        backward_ms=1e3 * statistics.median(b for _, b in hooked),
        outside_ms=1e3 * statistics.median(outside),
        unhooked_ms=1e3 * statistics.median(plain),
        not_run=[name for key, (name, _) in timer.leaves.items() if key not in timer.calls],
        notes=[FUSION_NOTE])
    if print_table:
        print(result.table(), flush=True)
    return result


def _timed_steps(timer, runner, warmup, steps):
    """Each step once with the timer's hooks, then once without (the model as it trains:
    layers fused in containers) -> per timed step: (forward s, backward s) with hooks,
    seconds without, and seconds of the hooked step outside leaf layers."""
    hooked, plain, outside = [], [], []
    for step in range(warmup + steps):
        timer.recording, timer.step_leaf_seconds = step >= warmup, 0.0
        timer.attach()
        try:
            seconds = runner.run()
        finally:
            timer.detach()
        unhooked = runner.run()
        if step >= warmup:
            hooked.append(seconds)
            plain.append(sum(unhooked))
            outside.append(sum(seconds) - timer.step_leaf_seconds)
    return hooked, plain, outside


def _layer_profile(timer, key, peak):
    """The LayerProfile of leaf ``key`` from what the timer recorded."""
    name, module = timer.leaves[key]
    call = timer.calls[key]
    shapes = call["input_shape"], call["output_shape"]
    flops = layer_flops(module, *shapes, call["input_grad"])
    moved = ((0, 0) if flops is not None or call["view"]
             else layer_bytes(*shapes, call["itemsize"], call["input_grad"]))
    flops = flops or (0, 0)
    passes = []
    for direction, count, nbytes in zip(("forward", "backward"), flops, moved):
        seconds = timer.seconds[direction].get(key)
        passes.append(Pass.of(1e3 * statistics.median(seconds), count, nbytes, peak)
                      if seconds else None)
    return LayerProfile(name or "(model)", type(module).__name__, *shapes, *passes)


def flop_counts(model, input_shape, backward=True):
    """(forward, backward) FLOPs of one step of ``model`` on ``input_shape`` (the sum of
    :func:`layer_flops` over its layers; backward 0 when ``backward`` is False)."""
    result = profile(model, input_shape, steps=1, warmup=0, backward=backward, peak=1.0,
                     print_table=False)
    return (sum(layer.forward.flops for layer in result.layers),
            sum(layer.backward.flops for layer in result.layers if layer.backward))


def _checked_arguments(model, input_shape, steps, warmup, peak):
    """input_shape as a tuple of ints, or ValueError/TypeError naming the argument."""
    if not isinstance(model, Module):
        raise TypeError(f"cyconv.profile: expected a cyconv Module, got {type(model).__name__}")
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                            and s >= 1 for s in shape):
        raise ValueError("cyconv.profile: expected input_shape as a tuple of positive ints "
                         f"with the batch first, e.g. (32, 3, 128, 128), got {input_shape!r}")
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"cyconv.profile: expected {name} to be an int >= {low}, "
                             f"got {value!r}")
    if peak is not None and not (isinstance(peak, (int, float)) and peak > 0):
        raise ValueError(f"cyconv.profile: expected peak to be a positive GFLOP/s number or "
                         f"None (measure it), got {peak!r}")
    with contextlib.suppress(NotImplementedError):
        model.output_shape(shape)   # a shape the model does not take fails here, clearly
    return tuple(int(s) for s in shape)
