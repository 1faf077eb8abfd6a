"""Fuzzing every kernel against the numpy reference (tests/reference.py).

Hypothesis draws legal and illegal shapes, strides, paddings, dilations,
dtypes, labels and gradients.  A legal draw must match the reference; an
illegal one must raise ValueError or TypeError before any kernel runs.
Deterministic (derandomize=True) and small, so that CI can run this file
against the CYCONV_DEBUG build (bounds checks on), where an out-of-bounds
memoryview index raises instead of corrupting memory.  The counts of
legal and illegal draws are printed by the last test (pytest -s).
"""
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyconv import nn, optim

import reference as ref
from conftest import TOL, assert_close, num_threads

INT_MAX = 2**31 - 1
COUNTS = Counter()          # (test, "legal" | "illegal") -> draws
ERRORS = (ValueError, TypeError)


def fuzz(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def draw_dtype(data, legal):
    """legal with probability ~7/8, else an illegal dtype."""
    return data.draw(st.sampled_from([legal] * 7 + [np.float16, np.int32, np.float64
                                                    if legal == np.float32 else np.float32]))


def draw_size(data, low=1, high=4, huge=(2**20, 2**31, 2**40)):
    """Mostly low..high, sometimes huge (1 in 10)."""
    small = list(range(low, high + 1))
    return data.draw(st.sampled_from(small * (9 * len(huge) // len(small) + 1) + list(huge)))


def draw_extent(data, high=9):
    """An image size: mostly 1..high, sometimes 0."""
    return data.draw(st.sampled_from(list(range(1, high + 1)) * 3 + [0]))


def random(data, shape, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape)
    return x.astype(dtype)


def expect_error(name, call):
    COUNTS[name, "illegal"] += 1
    with pytest.raises(ERRORS):
        call()


def tol(dtype):
    return dict(TOL[np.dtype(dtype).type])


def check_backward(name, data, layer, y, dtype):
    """Sometimes a wrong gradient first (must raise), then a right one; returns dy."""
    dy = random(data, y.shape, dtype)
    wrong = data.draw(st.sampled_from([None] * 4 + ["shape", "dtype", "ndim"]))
    if wrong == "shape":
        bad_shape = y.shape[:-1] + (y.shape[-1] + 1,) if y.ndim else (2,)
        expect_error(name, lambda: layer.backward(random(data, bad_shape, dtype)))
    elif wrong == "dtype":
        expect_error(name, lambda: layer.backward(dy.astype(np.float16)))
    elif wrong == "ndim":
        expect_error(name, lambda: layer.backward(dy[None]))
    return dy


# ---------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------
@fuzz(300)
@given(st.data())
def test_fuzz_conv2d(data):
    name = "conv2d"
    c_in, c_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    stride = (draw_size(data), draw_size(data))
    padding = (draw_size(data, 0, 4, (2**30, 2**31)), draw_size(data, 0, 3, (2**30,)))
    dilation = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    bias, fuse = data.draw(st.booleans()), data.draw(st.booleans())
    groups = data.draw(st.sampled_from([g for g in range(1, 5) if c_in % g == 0 == c_out % g]))
    layer = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups=groups, bias=bias,
                      dtype=dtype, seed=data.draw(st.integers(0, 99)), fuse_relu=fuse)
    n = data.draw(st.integers(0, 3))
    channels = data.draw(st.sampled_from([c_in] * 9 + [c_in + 1]))
    h, w = draw_extent(data), draw_extent(data)
    x_dtype = draw_dtype(data, dtype)
    x = random(data, (n, channels, h, w), x_dtype)

    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    out = [ref.conv_out_size(s, k, st_, p, d) for s, k, st_, p, d
           in zip((h, w), kernel, stride, padding, dilation)]
    fits = all(s + 2 * p + st_ + e <= INT_MAX for s, p, st_, e in zip((h, w), padding, stride, span))
    legal = (x_dtype == dtype and channels == c_in and h > 0 and w > 0 and min(out) >= 1 and fits
             and out[0] * out[1] <= INT_MAX)
    threads = data.draw(st.integers(1, 3))
    with num_threads(threads):
        if not legal:
            expect_error(name, lambda: layer(x))
            return
        COUNTS[name, "legal"] += 1
        y = layer(x)
        b = layer.bias.data if bias else None
        y_ref = ref.conv2d_forward(x, layer.weight.data, b, stride, padding, dilation, groups)
        if fuse:
            y_ref = np.maximum(y_ref, 0)
        assert y.shape == y_ref.shape and y.dtype == dtype
        assert_close(y, y_ref, dtype)
        dy = check_backward(name, data, layer, y, dtype)
        input_grad = data.draw(st.booleans())
        dx = layer.backward(dy, input_grad=input_grad)
    dy_eff = np.where(y > 0, dy, 0) if fuse else dy
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(x, layer.weight.data, dy_eff, stride, padding,
                                                 dilation, bias, groups)
    if input_grad:
        assert_close(dx, dx_ref, dtype)
    else:
        assert dx is None
    assert_close(layer.weight.grad, dw_ref, dtype)
    if bias:
        assert_close(layer.bias.grad, db_ref, dtype)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------
@fuzz(250)
@given(st.data())
def test_fuzz_pool2d(data):
    kind = data.draw(st.sampled_from(["max", "max", "avg", "avg_exclude"]))
    name = f"{kind}_pool2d"
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    stride = (draw_size(data, 1, 4, (2**20, 2**31)), draw_size(data, 1, 4, (2**40,)))
    padding = tuple(data.draw(st.sampled_from([0] * 4 + [1, 1, 2, 3])) for _ in kernel)
    make = (lambda: nn.MaxPool2d(kernel, stride, padding)) if kind == "max" else \
        (lambda: nn.AvgPool2d(kernel, stride, padding, count_include_pad=kind == "avg"))
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        expect_error(name, make)
        return
    layer = make()
    dtype = draw_dtype(data, data.draw(st.sampled_from([np.float32, np.float64])))
    shape = (data.draw(st.integers(0, 2)), draw_extent(data, 3), draw_extent(data, 8),
             draw_extent(data, 8))
    x = random(data, shape, dtype)
    out = [ref.pool_out_size(s, k, st_, p) for s, k, st_, p in zip(shape[2:], kernel, stride, padding)]
    fits = all(s + 2 * p + st_ + k <= INT_MAX for s, p, st_, k in zip(shape[2:], padding, stride, kernel))
    legal = dtype in (np.float32, np.float64) and min(shape[1:]) > 0 and min(out) >= 1 and fits
    with num_threads(data.draw(st.integers(1, 3))):
        if not legal:
            expect_error(name, lambda: layer(x))
            return
        COUNTS[name, "legal"] += 1
        y = layer(x)
        dy = check_backward(name, data, layer, y, dtype)
        dx = layer.backward(dy)
    if kind == "max":
        y_ref, _ = ref.max_pool2d_forward(x, kernel, stride, padding)
        dx_ref = ref.max_pool2d_backward(x, dy, kernel, stride, padding)
    else:
        y_ref = ref.avg_pool2d_forward(x, kernel, stride, padding, kind == "avg")
        dx_ref = ref.avg_pool2d_backward(x, dy, kernel, stride, padding, kind == "avg")
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@fuzz(40)
@given(st.data())
def test_fuzz_global_avg_pool(data):
    name = "global_avg_pool"
    layer = nn.AdaptiveAvgPool2d(1)
    dtype = draw_dtype(data, data.draw(st.sampled_from([np.float32, np.float64])))
    ndim = data.draw(st.sampled_from([4] * 7 + [3, 5]))
    shape = (data.draw(st.integers(0, 3)),) + tuple(draw_extent(data, 5) for _ in range(ndim - 1))
    x = random(data, shape, dtype)
    if dtype not in (np.float32, np.float64) or ndim != 4 or min(shape[1:]) == 0:
        expect_error(name, lambda: layer(x))
        return
    COUNTS[name, "legal"] += 1
    y = layer(x)
    assert_close(y, ref.global_avg_pool_forward(x), dtype)
    dy = check_backward(name, data, layer, y, dtype)
    assert_close(layer.backward(dy), ref.global_avg_pool_backward(x, dy), dtype)


# ---------------------------------------------------------------------------
# linear, batch norm
# ---------------------------------------------------------------------------
@fuzz(80)
@given(st.data())
def test_fuzz_linear(data):
    name = "linear"
    f_in, f_out = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 70))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    bias = data.draw(st.booleans())
    layer = nn.Linear(f_in, f_out, bias=bias, dtype=dtype, seed=0)
    x_dtype = draw_dtype(data, dtype)
    shape = data.draw(st.sampled_from([(data.draw(st.integers(0, 5)), f_in)] * 6 +
                                      [(3, f_in + 1), (3, f_in, 1), (f_in,), (2, 0)]))
    x = random(data, shape, x_dtype)
    with num_threads(data.draw(st.integers(1, 3))):
        if x_dtype != dtype or shape[1:] != (f_in,):
            expect_error(name, lambda: layer(x))
            return
        COUNTS[name, "legal"] += 1
        y = layer(x)
        dy = check_backward(name, data, layer, y, dtype)
        dx = layer.backward(dy)
    assert_close(y, ref.linear_forward(x, layer.weight.data, layer.bias.data if bias else None), dtype)
    dx_ref, dw_ref, db_ref = ref.linear_backward(x, layer.weight.data, dy, bias)
    assert_close(dx, dx_ref, dtype)
    assert_close(layer.weight.grad, dw_ref, dtype)
    if bias:
        assert_close(layer.bias.grad, db_ref, dtype)


@fuzz(80)
@given(st.data())
def test_fuzz_batch_norm(data):
    name = "batch_norm2d"
    c = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    layer = nn.BatchNorm2d(c, dtype=dtype, momentum=0.3)
    training = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    layer.weight.data[...] = rng.uniform(0.5, 1.5, c)
    layer.bias.data[...] = rng.standard_normal(c)
    if not training:
        layer.eval()
        layer.running_mean[...] = rng.standard_normal(c)
        layer.running_var[...] = rng.uniform(0.5, 2, c)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    x_dtype = draw_dtype(data, dtype)
    shape = (data.draw(st.integers(0, 3)), data.draw(st.sampled_from([c] * 7 + [c + 1])),
             draw_extent(data, 4), draw_extent(data, 4))
    x = random(data, shape, x_dtype) * 2 + 1
    n, _, h, w = shape
    legal = (x_dtype == dtype and shape[1] == c and h > 0 and w > 0
             and (not training or n * h * w >= 2))
    with num_threads(data.draw(st.integers(1, 3))):
        if not legal:
            expect_error(name, lambda: layer(x))
            return
        COUNTS[name, "legal"] += 1
        y = layer(x)
        dy = check_backward(name, data, layer, y, dtype)
        dx = layer.backward(dy)
    if n == 0:
        assert y.shape == dx.shape == shape
        return
    args = (layer.weight.data, layer.bias.data, rm, rv)
    if training:
        y_ref, rm_ref, rv_ref = ref.batch_norm2d_train_forward(x, *args, momentum=0.3)
        assert_close(layer.running_mean, rm_ref, dtype)
        assert_close(layer.running_var, rv_ref, dtype)
        dx_ref, dw_ref, db_ref = ref.batch_norm2d_train_backward(x, layer.weight.data, dy)
    else:
        y_ref = ref.batch_norm2d_eval_forward(x, *args)
        dx_ref, dw_ref, db_ref = ref.batch_norm2d_eval_backward(x, layer.weight.data, rm, rv, dy)
    scale = 1e3 if dtype == np.float32 and h * w * n <= 3 else None   # nearly constant planes
    assert_close(y, y_ref, dtype, scale=scale)
    assert_close(dx, dx_ref, dtype, scale=scale)
    assert_close(layer.weight.grad, dw_ref, dtype, scale=scale)
    assert_close(layer.bias.grad, db_ref, dtype)


# ---------------------------------------------------------------------------
# element-wise layers: any shape
# ---------------------------------------------------------------------------
@fuzz(150)
@given(st.data())
def test_fuzz_elementwise(data):
    kind = data.draw(st.sampled_from(["relu", "leaky", "dropout", "flatten"]))
    name = kind
    slope = data.draw(st.floats(-2, 2))
    p = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]))
    layer = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(slope),
             "dropout": lambda: nn.Dropout(p, seed=3), "flatten": nn.Flatten}[kind]()
    dtype = data.draw(st.sampled_from([np.float32, np.float64] * 3 + [np.float16, np.int16, object]))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    x = random(data, shape, dtype)
    legal = dtype in (np.float32, np.float64) and (kind != "flatten" or len(shape) >= 1)
    with num_threads(data.draw(st.integers(1, 3))):
        if not legal:
            expect_error(name, lambda: layer(x))
            return
        COUNTS[name, "legal"] += 1
        y = layer(x)
        dy = check_backward(name, data, layer, y, dtype)
        dx = layer.backward(dy)
    assert dx.shape == x.shape and dx.dtype == dtype
    if kind == "relu":
        assert_close(y, ref.relu_forward(x), dtype)
        assert_close(dx, ref.relu_backward(x, dy), dtype)
    elif kind == "leaky":
        assert_close(y, ref.leaky_relu_forward(x, slope), dtype)
        assert_close(dx, ref.leaky_relu_backward(x, dy, slope), dtype)
    elif kind == "flatten":
        assert y.shape == (shape[0], int(np.prod(shape[1:], dtype=np.int64)))
        np.testing.assert_array_equal(y.reshape(shape), x)
        np.testing.assert_array_equal(dx, dy.reshape(shape))
    else:
        kept = y != 0
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        np.testing.assert_allclose(y[kept], (x * scale)[kept], **tol(dtype))
        np.testing.assert_allclose(dx, np.where(kept | (x == 0), dy * scale, 0),
                                   **tol(dtype))


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------
@fuzz(120)
@given(st.data())
def test_fuzz_cross_entropy(data):
    name = "cross_entropy"
    smoothing = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.1, 1.5]))
    if not 0 <= smoothing <= 1:
        expect_error(name, lambda: nn.CrossEntropyLoss(smoothing))
        return
    loss_fn = nn.CrossEntropyLoss(smoothing)
    n, c = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 6))
    dtype = draw_dtype(data, data.draw(st.sampled_from([np.float32, np.float64])))
    logits = random(data, (n, c), dtype) * 5
    label_dtype = data.draw(st.sampled_from([np.int64] * 5 + [np.int32, np.uint8, np.int8,
                                                               np.float64, np.bool_]))
    labels = np.array(data.draw(st.lists(st.integers(-1 if label_dtype not in (np.uint8, np.bool_) else 0,
                                                     max(c, 1)),
                                         min_size=n, max_size=n)), dtype=np.int64)
    labels = labels.astype(label_dtype) if label_dtype != np.bool_ else labels.astype(bool)
    reshape = data.draw(st.sampled_from([None] * 6 + ["2d", "short", "long"]))
    if reshape == "2d":
        labels = labels[:, None]
    elif reshape == "short":
        labels = labels[:-1]
    elif reshape == "long":
        labels = np.append(labels, labels[:1]).astype(labels.dtype)
    legal = (dtype in (np.float32, np.float64) and n > 0 and c > 0
             and np.dtype(label_dtype).kind in "iu" and labels.shape == (n,)
             and labels.min(initial=0) >= 0 and labels.max(initial=0) < c)
    with num_threads(data.draw(st.integers(1, 3))):
        if not legal:
            expect_error(name, lambda: loss_fn(logits, labels))
            return
        COUNTS[name, "legal"] += 1
        value = loss_fn(logits, labels)
        grad = loss_fn.backward()
    labels = labels.astype(np.int64)
    assert_close(value, ref.cross_entropy_forward(logits, labels, smoothing), dtype)
    assert_close(grad, ref.cross_entropy_backward(logits, labels, smoothing), dtype)


# ---------------------------------------------------------------------------
# the optimizers
# ---------------------------------------------------------------------------
@fuzz(100)
@given(st.data())
def test_fuzz_optimizers(data):
    kind = data.draw(st.sampled_from(["sgd", "adam", "adamw"]))
    name = kind
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    param = nn.Parameter(random(data, shape, dtype))
    lr = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, -0.1, float("nan")]))
    weight_decay = data.draw(st.sampled_from([0.0, 1e-2, 0.5, -1.0]))
    if kind == "sgd":
        momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, -0.5]))
        dampening = data.draw(st.sampled_from([0.0, 0.3]))
        nesterov = data.draw(st.booleans())
        hyper = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     nesterov=nesterov)
        legal = momentum >= 0 and weight_decay >= 0 and (not nesterov or (momentum > 0 and dampening == 0))
        make = lambda: optim.SGD([param], lr, **hyper)
        step = lambda p, g, s: ref.sgd_step(p, g, s, lr, **hyper)
    else:
        betas = data.draw(st.sampled_from([(0.9, 0.999), (0.0, 0.5), (1.0, 0.9)]))
        eps = data.draw(st.sampled_from([1e-8, 1e-3, 0.0]))
        legal = betas[0] < 1 and eps > 0 and weight_decay >= 0
        cls = optim.Adam if kind == "adam" else optim.AdamW
        make = lambda: cls([param], lr, betas, eps, weight_decay)
        step = lambda p, g, s: ref.adam_step(p, g, s, lr, betas, eps, weight_decay,
                                             decoupled=kind == "adamw")
    legal = legal and lr >= 0
    if not legal:
        expect_error(name, make)
        return
    COUNTS[name, "legal"] += 1
    opt = make()
    p_ref, state = param.data.astype(np.float64), {}
    with num_threads(data.draw(st.integers(1, 3))):
        for _ in range(3):
            param.grad[...] = random(data, shape, dtype)
            p_ref = step(p_ref, param.grad, state)
            opt.step()
    assert_close(param.data, p_ref, dtype)


# ---------------------------------------------------------------------------
def test_fuzz_summary():
    """The draws per test (run with -s to see them); every test saw both kinds."""
    legal = sum(v for (_, kind), v in COUNTS.items() if kind == "legal")
    illegal = sum(v for (_, kind), v in COUNTS.items() if kind == "illegal")
    print(f"\nfuzz: {legal} legal and {illegal} illegal inputs")
    for (test, kind), count in sorted(COUNTS.items()):
        print(f"  {test:16} {kind:8} {count}")
    if COUNTS:     # (empty when this test runs alone)
        assert legal > 0 and illegal > 0
