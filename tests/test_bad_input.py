"""Illegal input sweep: every layer, the loss and the constructors fed bad values.

Each case must raise ValueError, TypeError or RuntimeError whose message
names what was expected and what came; legal edge cases (empty batch,
NaN/inf values, a forward that failed after a good one) must just work.
Never a crash: the whole sweep runs in child processes (``python
tests/test_bad_input.py --start K``), so a segfault in a kernel fails the
case that was running instead of killing pytest, and the sweep goes on with
the next case.  Run against a CYCONV_DEBUG build (PYTHONPATH=the clone), an
out-of-bounds memoryview index raises IndexError and fails its case too.

NaN/inf policy: layers propagate non-finite values like PyTorch (no check,
no crash: MaxPool2d lets a NaN win its window); CrossEntropyLoss with
non-finite logits returns nan, as torch does, and the Trainer stops on a
non-finite loss; load_state_dict refuses NaN/inf.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cyconv
from cyconv import nn

ALLOWED = ("ValueError", "TypeError", "RuntimeError")
CASES = {}   # id -> (function, expect_error, regexes the message must match)


def shape_regex(shape):
    """'(2, 3, 4)', '[2, 3, 4]' or '2x3x4' for a shape; '()' for a 0-d one."""
    return r"\D+".join(str(int(s)) for s in shape) if len(shape) else re.escape("()")


def dtype_regex(dtype):
    return re.escape(str(np.dtype(dtype)))


def bad(case_id, fn, *mentions):
    """A case that must raise one of ALLOWED whose message matches every regex."""
    assert case_id not in CASES, case_id
    CASES[case_id] = (fn, True, mentions)


def legal(case_id, fn):
    """A case that must run without an exception (fn asserts what it checks)."""
    assert case_id not in CASES, case_id
    CASES[case_id] = (fn, False, ())


def arr(shape, dtype=np.float32, fill=1.0):
    return np.full(shape, fill, dtype)


# ---------------------------------------------------------------------------
# the layers: factory(dtype), a good input shape, which dimensions are fixed
# ---------------------------------------------------------------------------
def _bn_eval(d):
    return nn.BatchNorm2d(3, dtype=d).eval()


def _sequential(d):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=d, seed=0), nn.BatchNorm2d(4, dtype=d),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 2, dtype=d, seed=1))


# name: (factory(dtype), input shape, has a dtype, fixed channels (dim 1) or None, 4-D only)
LAYERS = {
    "conv": (lambda d: nn.Conv2d(3, 4, 3, padding=1, dtype=d, seed=0), (2, 3, 6, 5), True, 3, True),
    "conv_strided": (lambda d: nn.Conv2d(3, 2, (3, 2), stride=(2, 3), padding=(1, 0),
                                         dilation=(2, 1), dtype=d, seed=0), (2, 3, 9, 8), True, 3, True),
    "conv_fused": (lambda d: nn.Conv2d(3, 4, 1, bias=False, fuse_relu=True, dtype=d, seed=0),
                   (2, 3, 4, 4), True, 3, True),
    "linear": (lambda d: nn.Linear(5, 3, dtype=d, seed=0), (4, 5), True, 5, False),
    "linear_nobias": (lambda d: nn.Linear(5, 70, bias=False, dtype=d, seed=0), (3, 5), True, 5, False),
    "bn_train": (lambda d: nn.BatchNorm2d(3, dtype=d), (2, 3, 4, 4), True, 3, True),
    "bn_eval": (_bn_eval, (2, 3, 4, 4), True, 3, True),
    "maxpool": (lambda d: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6), False, None, True),
    "avgpool": (lambda d: nn.AvgPool2d(2, padding=1, count_include_pad=False), (2, 3, 5, 5),
                False, None, True),
    "gap": (lambda d: nn.AdaptiveAvgPool2d(1), (2, 3, 4, 4), False, None, True),
    "relu": (lambda d: nn.ReLU(), (2, 3, 4, 4), False, None, False),
    "leaky": (lambda d: nn.LeakyReLU(0.2), (2, 3, 4), False, None, False),
    "dropout": (lambda d: nn.Dropout(0.3, seed=1), (2, 3, 4, 4), False, None, False),
    "flatten": (lambda d: nn.Flatten(), (2, 3, 4, 4), False, None, False),
    "sequential": (_sequential, (2, 3, 6, 6), True, 3, True),
}
SHAPED = [name for name, spec in LAYERS.items() if spec[3] is not None or spec[4]]

BAD_DTYPES = {
    "int8": np.int8, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
    "float16": np.float16, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "object": object, "big_endian_f4": ">f4",
    "big_endian_f8": ">f8", "longdouble": np.longdouble, "str": "U3",
    "structured": [("a", np.float32)],
}
NOT_ARRAYS = {"none": (None, "NoneType"), "float": (1.5, "float"), "str": ("abc", "str"),
              "list": ([[1.0, 2.0]], "list"), "tuple": ((1.0,), "tuple"),
              "np_scalar": (np.float32(1.0), "float32"), "dict": ({}, "dict")}


def _forward_backward(layer, x, grad_dtype=None):
    """One forward and backward; checks the shapes that come back."""
    y = layer(x)
    g = np.ones(y.shape, y.dtype if grad_dtype is None else grad_dtype)
    dx = layer.backward(g)
    assert dx.shape == x.shape and dx.dtype == x.dtype, (dx.shape, dx.dtype)
    return y, dx


for name, (make, shape, typed, channels, four_d) in LAYERS.items():
    # -- dtypes and non-arrays ------------------------------------------------
    for dname, dtype in BAD_DTYPES.items():
        bad(f"{name}-input-dtype-{dname}",
            lambda make=make, shape=shape, dtype=dtype: make(np.float32)(np.zeros(shape, dtype)),
            dtype_regex(dtype))
    for kind, (value, type_name) in NOT_ARRAYS.items():
        bad(f"{name}-input-{kind}", lambda make=make, value=value: make(np.float32)(value),
            re.escape(type_name))
    if typed:
        for layer_dtype, x_dtype in ((np.float32, np.float64), (np.float64, np.float32)):
            bad(f"{name}-input-mismatch-{np.dtype(layer_dtype).name}-{np.dtype(x_dtype).name}",
                lambda make=make, shape=shape, ld=layer_dtype, xd=x_dtype: make(ld)(arr(shape, xd)),
                dtype_regex(layer_dtype), dtype_regex(x_dtype))

    # -- shapes ----------------------------------------------------------------
    if name in SHAPED:
        ndims = [(), (shape[1],), shape[:2], shape[:3], shape + (1,), (1,) + shape] if four_d else \
            [(), (shape[1],), shape + (1,), (1,) + shape, shape + (2, 2)]
        for bad_shape in ndims:
            bad(f"{name}-ndim-{len(bad_shape)}-{'x'.join(map(str, bad_shape))}",
                lambda make=make, s=bad_shape: make(np.float32)(arr(s)), shape_regex(bad_shape))
        if channels is not None:
            for c in (channels - 1, channels + 1, 1, 64):
                if c == channels:
                    continue
                bad_shape = (shape[0], c) + shape[2:]
                bad(f"{name}-channels-{c}", lambda make=make, s=bad_shape: make(np.float32)(arr(s)),
                    str(channels), shape_regex(bad_shape))
        zero_dims = [1, 2, 3] if four_d else [1]
        for axis in zero_dims:
            bad_shape = tuple(0 if i == axis else s for i, s in enumerate(shape))
            bad(f"{name}-zero-dim{axis}", lambda make=make, s=bad_shape: make(np.float32)(arr(s)),
                shape_regex(bad_shape))

    # -- an empty batch: legal (PyTorch allows it), except BatchNorm training --
    empty = (0,) + shape[1:]
    if name in ("bn_train", "sequential"):
        bad(f"{name}-empty-batch", lambda make=make, s=empty: make(np.float32)(arr(s)),
            "more than 1 value", r"\(0, [34], 6, 6\)" if name == "sequential" else shape_regex(empty))
    else:
        legal(f"{name}-empty-batch",
              lambda make=make, s=empty: _forward_backward(make(np.float32), arr(s)))

    # -- NaN / inf values: propagated, never a crash --------------------------
    for fill in (np.nan, np.inf, -np.inf):
        for dtype in (np.float32, np.float64):
            def nonfinite(make=make, shape=shape, fill=fill, dtype=dtype):
                layer = make(dtype)
                x = arr(shape, dtype, 0.5)
                x.reshape(-1)[::3] = fill
                y, dx = _forward_backward(layer, x)
                # (ReLU keeps a NaN, as PyTorch does: tests/test_activation.py)
                if isinstance(layer, (nn.MaxPool2d, nn.ReLU)) and fill == np.inf:
                    assert not np.all(np.isfinite(y))   # the non-finite value came through
            legal(f"{name}-values-{fill}-{np.dtype(dtype).name}", nonfinite)

    # -- backward misuse -----------------------------------------------------
    bad(f"{name}-backward-before-forward",
        lambda make=make, shape=shape: make(np.float32).backward(arr(shape)), "before forward")

    def after_no_grad(make=make, shape=shape):
        layer = make(np.float32)
        with cyconv.no_grad():
            y = layer(arr(shape))
        layer.backward(np.ones_like(y))
    bad(f"{name}-backward-after-no-grad", after_no_grad, "before forward|no_grad")

    out_shape = make(np.float32)(arr(shape)).shape
    wrong = [out_shape[:-1], out_shape + (1,), (), (1,) + out_shape, out_shape[::-1]]
    wrong += [tuple(s + 1 if i == axis else s for i, s in enumerate(out_shape))
              for axis in range(len(out_shape))]
    wrong += [(0,) + out_shape[1:]]
    for bad_shape in dict.fromkeys(wrong):
        if bad_shape == out_shape:
            continue
        def wrong_grad(make=make, shape=shape, bad_shape=bad_shape):
            layer = make(np.float32)
            layer(arr(shape))
            layer.backward(arr(bad_shape))
        bad(f"{name}-grad-shape-{'x'.join(map(str, bad_shape)) or 'scalar'}", wrong_grad,
            shape_regex(out_shape), shape_regex(bad_shape))
    for dname, dtype in list(BAD_DTYPES.items()) + [("float64", np.float64)]:
        def wrong_grad_dtype(make=make, shape=shape, dtype=dtype):
            layer = make(np.float32)
            y = layer(arr(shape))
            layer.backward(np.zeros(y.shape, dtype))
        bad(f"{name}-grad-dtype-{dname}", wrong_grad_dtype, "float32", dtype_regex(dtype))
    for kind, (value, type_name) in NOT_ARRAYS.items():
        def grad_not_array(make=make, shape=shape, value=value):
            layer = make(np.float32)
            layer(arr(shape))
            layer.backward(value)
        bad(f"{name}-grad-{kind}", grad_not_array, re.escape(type_name))

    # -- a failed call leaves the layer usable --------------------------------
    def survives_errors(make=make, shape=shape, name=name):
        layer = make(np.float64)
        x = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape)
        y = layer(x)
        bad_xs = [arr(shape, np.int32), arr(shape, np.float16)]
        if name in SHAPED:
            bad_xs += [arr(shape[:-1], np.float64), arr((0,) + shape[1:-1] + (0,), np.float64)]
        for bad_x in bad_xs:
            with pytest.raises((ValueError, TypeError)):
                layer(bad_x)
        for bad_g in (arr(y.shape, np.float32), arr(y.shape + (1,), np.float64)):
            with pytest.raises((ValueError, TypeError)):
                layer.backward(bad_g)
        dx = layer.backward(np.ones_like(y))
        assert dx.shape == shape
    legal(f"{name}-usable-after-errors", survives_errors)

# ---------------------------------------------------------------------------
# an image smaller than the kernel after padding (and the smallest legal one)
# ---------------------------------------------------------------------------
for k in (2, 3, 5):
    for p in range(k // 2 + 1):
        for d in (1, 2):
            extent = (k - 1) * d + 1
            small = extent - 2 * p - 1        # one pixel short
            if small >= 1:
                bad(f"conv-too-small-k{k}-p{p}-d{d}",
                    lambda k=k, p=p, d=d, s=small: nn.Conv2d(1, 1, k, padding=p, dilation=d)(
                        arr((1, 1, s, 9))), f"{small}x9", f"{extent}x{extent}")
                bad(f"conv-too-small-w-k{k}-p{p}-d{d}",
                    lambda k=k, p=p, d=d, s=small: nn.Conv2d(1, 1, k, padding=p, dilation=d)(
                        arr((1, 1, 9, s))), f"9x{small}")
            legal(f"conv-just-fits-k{k}-p{p}-d{d}",
                  lambda k=k, p=p, d=d, s=max(small + 1, 1): _forward_backward(
                      nn.Conv2d(1, 1, k, padding=p, dilation=d), arr((1, 1, s, s))))
        small = k - 2 * p - 1
        for pool in ("MaxPool2d", "AvgPool2d"):
            if small >= 1:
                bad(f"{pool}-too-small-k{k}-p{p}",
                    lambda k=k, p=p, s=small, pool=pool: getattr(nn, pool)(k, padding=p)(
                        arr((1, 2, s, 5))), f"{small}x5", f"{k}x{k}")
            legal(f"{pool}-just-fits-k{k}-p{p}",
                  lambda k=k, p=p, s=max(small + 1, 1), pool=pool: _forward_backward(
                      getattr(nn, pool)(k, padding=p), arr((1, 2, s, s), fill=np.nan)))

# huge strides, paddings and dilations: clear errors, not 32-bit overflows in the kernels
for stride, padding, dilation in [(2**31 - 1, 2**30, 1), (2**40, 0, 1), (2**30, 2**31, 1),
                                  (1, 2**31, 1), (1, 0, 2**31), (3, 2**29, 2**29)]:
    bad(f"conv-huge-s{stride}-p{padding}-d{dilation}",
        lambda s=stride, p=padding, d=dilation: nn.Conv2d(1, 1, 2, stride=s, padding=p, dilation=d)(
            arr((1, 1, 4, 4))), r"2147483647|smaller than the kernel")
for kernel, stride in [(3, 2**31 - 1), (3, 2**33), (2**31 - 1, 1), (2**32, 2)]:
    for pool in ("MaxPool2d", "AvgPool2d"):
        bad(f"{pool}-huge-k{kernel}-s{stride}",
            lambda k=kernel, s=stride, pool=pool: getattr(nn, pool)(k, stride=s, padding=1)(
                arr((1, 1, 4, 4))), r"2147483647|smaller than the kernel")
# the biggest sizes that do fit still work
legal("conv-big-stride-fits", lambda: _forward_backward(
    nn.Conv2d(1, 1, 2, stride=2**30, padding=1), arr((1, 1, 4, 4))))
legal("maxpool-big-stride-fits", lambda: _forward_backward(
    nn.MaxPool2d(3, stride=2**30, padding=1), arr((1, 1, 4, 4))))
legal("conv-padding-larger-than-kernel", lambda: _forward_backward(
    nn.Conv2d(2, 3, 1, padding=4), arr((1, 2, 2, 3))))

# ---------------------------------------------------------------------------
# constructor arguments
# ---------------------------------------------------------------------------
BAD_SIZES = {"0": 0, "neg": -1, "float": 2.0, "frac": 1.5, "true": True, "none": None,
             "str": "3", "triple": (1, 2, 3), "single": (2,), "pair_zero": (0, 1),
             "pair_neg": (1, -1), "pair_float": (1, 2.0), "empty": (), "np_float": np.float64(2),
             "nan": float("nan"), "list_str": ["a", "b"], "dict": {}}
CONV_ARGS = dict(in_channels=2, out_channels=3, kernel_size=3, stride=1, padding=0, dilation=1)
for arg in CONV_ARGS:
    for label, value in BAD_SIZES.items():
        if arg == "padding" and label in ("0", "pair_zero"):
            continue                      # padding 0 is legal
        kwargs = dict(CONV_ARGS, **{arg: value})
        bad(f"Conv2d-{arg}-{label}", lambda kwargs=kwargs: nn.Conv2d(**kwargs),
            re.escape(arg), re.escape(repr(value)))
for label, value in BAD_SIZES.items():
    for arg in ("in_features", "out_features"):
        kwargs = dict(dict(in_features=2, out_features=3), **{arg: value})
        bad(f"Linear-{arg}-{label}", lambda kwargs=kwargs: nn.Linear(**kwargs),
            re.escape(arg), re.escape(repr(value)))
    bad(f"BatchNorm2d-num_features-{label}", lambda v=value: nn.BatchNorm2d(v),
        "num_features", re.escape(repr(value)))
    for pool in ("MaxPool2d", "AvgPool2d"):
        bad(f"{pool}-kernel_size-{label}", lambda v=value, pool=pool: getattr(nn, pool)(v),
            "kernel_size", re.escape(repr(value)))
        if label != "none":               # stride=None: the kernel size
            bad(f"{pool}-stride-{label}", lambda v=value, pool=pool: getattr(nn, pool)(2, stride=v),
                "stride", re.escape(repr(value)))
        if label not in ("0", "pair_zero"):
            bad(f"{pool}-padding-{label}", lambda v=value, pool=pool: getattr(nn, pool)(3, padding=v),
                "padding", re.escape(repr(value)))
for dname, dtype in list(BAD_DTYPES.items()) + [("str_name", "float16"),
                                                 ("nonsense", "floatx")]:
    for layer, ctor in (("Conv2d", lambda d: nn.Conv2d(1, 1, 1, dtype=d)),
                        ("Linear", lambda d: nn.Linear(1, 1, dtype=d)),
                        ("BatchNorm2d", lambda d: nn.BatchNorm2d(1, dtype=d))):
        bad(f"{layer}-dtype-{dname}", lambda ctor=ctor, d=dtype: ctor(d), "float32")
for pool in ("MaxPool2d", "AvgPool2d"):
    for k, p in [(2, 2), (3, 2), (1, 1), (4, 3), ((3, 3), (1, 2))]:
        bad(f"{pool}-padding-over-half-k{k}-p{p}", lambda k=k, p=p, pool=pool: getattr(nn, pool)(k, padding=p),
            "half", re.escape(str(p)))
BAD_NUMBERS = {"str": "0.5", "none": None, "nan": float("nan"), "list": [0.5], "complex": 0.5j,
               "array": np.array([0.5, 0.5]), "true": True}
for label, value in dict(BAD_NUMBERS, big=1.5, neg=-0.1, inf=float("inf")).items():
    bad(f"Dropout-p-{label}", lambda v=value: nn.Dropout(v), "p", "0, 1")
    bad(f"CrossEntropyLoss-label_smoothing-{label}",
        lambda v=value: nn.CrossEntropyLoss(label_smoothing=v), "label_smoothing", "0, 1")
    if label != "none":                   # momentum=None: a cumulative average
        bad(f"BatchNorm2d-momentum-{label}", lambda v=value: nn.BatchNorm2d(2, momentum=v),
            "momentum", "0, 1")
for label, value in dict(BAD_NUMBERS, zero=0.0, neg=-1e-5).items():
    bad(f"BatchNorm2d-eps-{label}", lambda v=value: nn.BatchNorm2d(2, eps=v), "eps")
for label, value in BAD_NUMBERS.items():
    bad(f"LeakyReLU-negative_slope-{label}", lambda v=value: nn.LeakyReLU(v), "negative_slope")
for label, value in {"2": 2, "0": 0, "pair": (2, 2), "none": None, "array": np.array([1, 1]),
                     "str": "1", "float": 0.5}.items():
    bad(f"AdaptiveAvgPool2d-output_size-{label}", lambda v=value: nn.AdaptiveAvgPool2d(v),
        "output_size", "1")
for label, value in {"relu_class": nn.ReLU, "function": abs, "none": None, "array": arr(2)}.items():
    bad(f"Sequential-item-{label}", lambda v=value: nn.Sequential(nn.ReLU(), v), "Module",
        "position 1")
for label, value in {"0": 0, "neg": -2, "float": 1.5, "true": True, "str": "2", "none": None}.items():
    bad(f"set_num_threads-{label}", lambda v=value: cyconv.set_num_threads(v), "threads",
        re.escape(repr(value)))

# ---------------------------------------------------------------------------
# CrossEntropyLoss: logits and labels
# ---------------------------------------------------------------------------
LOGITS = np.linspace(-2, 2, 12).reshape(4, 3)
LABELS = np.array([0, 2, 1, 2])


def loss(logits=LOGITS, labels=LABELS, smoothing=0.0):
    return nn.CrossEntropyLoss(smoothing)(logits, labels)


for label, labels, mention in [
        ("eq-C", [0, 3, 1, 2], r"\[0, 3\).*\b3\b"), ("big", [0, 1, 2, 10**6], "1000000"),
        ("neg", [-1, 0, 1, 2], "-1"), ("int-min", [0, 0, 0, np.iinfo(np.int64).min], "-9223372036"),
        ("uint64-huge", np.array([0, 1, 2**63 + 5, 0], np.uint64), "9223372036854775813"),
        ("int8-neg", np.array([0, 1, -128, 0], np.int8), "-128"),
        ("uint8-big", np.array([0, 255, 1, 0], np.uint8), "255")]:
    bad(f"loss-label-out-of-range-{label}", lambda labels=labels: loss(labels=np.asarray(labels)),
        mention, "position")
for n in (0, 1, 3, 5, 8):
    bad(f"loss-labels-length-{n}", lambda n=n: loss(labels=np.zeros(n, np.int64)), r"\(4,\)",
        rf"\({n},\)")
for label, labels, mention in [
        ("2d-col", LABELS[:, None], shape_regex((4, 1))), ("2d-row", LABELS[None, :], shape_regex((1, 4))),
        ("onehot", np.eye(3, dtype=np.int64)[LABELS], shape_regex((4, 3))), ("scalar", np.int64(1), re.escape("()"))]:
    bad(f"loss-labels-shape-{label}", lambda labels=labels: loss(labels=labels), r"\(4,\)", mention)
for label, labels in [("float", LABELS.astype(np.float64)), ("float32", LABELS.astype(np.float32)),
                      ("half", np.array([0.5, 1, 2, 0])), ("bool", np.array([True, False] * 2)),
                      ("object", LABELS.astype(object)), ("str", np.array(list("abcd"))),
                      ("complex", LABELS.astype(complex)), ("none", None), ("float-list", [0.0, 1.0, 2.0, 1.0]),
                      ("nan", np.array([0, np.nan, 1, 2]))]:
    bad(f"loss-labels-dtype-{label}", lambda labels=labels: loss(labels=labels), "integer")
for label, logits in [("1d", LOGITS[0]), ("3d", LOGITS[None]), ("0d", np.array(1.0)),
                      ("empty-batch", LOGITS[:0]), ("no-classes", LOGITS[:, :0])]:
    bad(f"loss-logits-shape-{label}", lambda logits=logits: loss(logits=logits), r"\(N, C\)",
        shape_regex(logits.shape))
for dname, dtype in BAD_DTYPES.items():
    bad(f"loss-logits-dtype-{dname}", lambda dtype=dtype: loss(logits=np.zeros((4, 3), dtype)),
        "float32 or float64", dtype_regex(dtype))
for kind, (value, type_name) in NOT_ARRAYS.items():
    bad(f"loss-logits-{kind}", lambda value=value: loss(logits=value), re.escape(type_name))
bad("loss-backward-before-forward", lambda: nn.CrossEntropyLoss().backward(), "before")


def _loss_nonfinite(fill, dtype, smoothing):
    logits = LOGITS.astype(dtype)
    logits[1, 2] = fill
    fn = nn.CrossEntropyLoss(smoothing)
    value = fn(logits, LABELS)
    grad = fn.backward()
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    if fill != -np.inf or smoothing:
        assert not np.isfinite(value), value   # nan (inf: -inf with smoothing), as PyTorch
    # the rows without a non-finite logit are not affected
    assert np.all(np.isfinite(grad[[0, 2, 3]]))


for fill in (np.nan, np.inf, -np.inf):
    for dtype in (np.float32, np.float64):
        for smoothing in (0.0, 0.1):
            legal(f"loss-logits-{fill}-{np.dtype(dtype).name}-ls{smoothing}",
                  lambda f=fill, d=dtype, s=smoothing: _loss_nonfinite(f, d, s))
legal("loss-labels-list", lambda: loss(labels=[0, 2, 1, 2]))
legal("loss-labels-uint8", lambda: loss(labels=LABELS.astype(np.uint8)))
legal("loss-labels-noncontiguous", lambda: loss(labels=np.array([0, 9, 2, 9, 1, 9, 2, 9])[::2]))

# ---------------------------------------------------------------------------
# mismatched layers in a Sequential, and load_state_dict
# ---------------------------------------------------------------------------
bad("sequential-dtype-mismatch", lambda: nn.Sequential(
    nn.Conv2d(1, 2, 1, dtype=np.float32), nn.Flatten(), nn.Linear(8, 2, dtype=np.float64))(
        arr((1, 1, 2, 2))), "float64", "float32")
bad("sequential-features-mismatch", lambda: nn.Sequential(
    nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(9, 2))(arr((1, 1, 2, 2))), "9", shape_regex((1, 8)))
bad("sequential-channels-mismatch", lambda: nn.Sequential(
    nn.Conv2d(1, 2, 1), nn.BatchNorm2d(3))(arr((2, 1, 2, 2))), "3", shape_regex((2, 2, 2, 2)))
for label, value in [("nan", np.nan), ("inf", np.inf)]:
    def load_nonfinite(value=value):
        layer = nn.Conv2d(1, 2, 1)
        sd = layer.state_dict()
        sd["weight"] = sd["weight"].copy()
        sd["weight"].reshape(-1)[0] = value
        layer.load_state_dict(sd)
    bad(f"load_state_dict-{label}", load_nonfinite, "weight", "NaN or inf")
for label, value in [("shape", np.zeros((2, 1, 2, 2), np.float32)), ("complex", np.zeros((2, 1, 1, 1), complex)),
                     ("str", np.full((2, 1, 1, 1), "a"))]:
    def load_bad(value=value):
        layer = nn.Conv2d(1, 2, 1)
        sd = layer.state_dict()
        sd["weight"] = value
        layer.load_state_dict(sd)
    bad(f"load_state_dict-{label}", load_bad, "weight")


# ---------------------------------------------------------------------------
# the child process and the tests
# ---------------------------------------------------------------------------
def _run_children(timeout=900):
    """Run every case in child processes; {case id: result dict}. A crash ends its case."""
    names = list(CASES)
    results, start = {}, 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    while start < len(names):
        proc = subprocess.run([sys.executable, "-X", "faulthandler", os.path.abspath(__file__),
                               "--start", str(start)], capture_output=True, text=True, env=env,
                              timeout=timeout)
        last = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "start" in record:
                last = record["start"]
            else:
                results[names[record["index"]]] = record
                last = None
        if proc.returncode == 0 and last is None:
            break
        if last is None:       # died outside a case (the import?)
            raise RuntimeError(f"bad-input child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[names[last]] = {"error": "CRASH", "message": f"child died with return code "
                                f"{proc.returncode}:\n{proc.stderr[-3000:]}"}
        start = last + 1
    return results


def _child(start):
    names = list(CASES)
    for index in range(start, len(names)):
        print(json.dumps({"start": index}), flush=True)
        fn, _, _ = CASES[names[index]]
        try:
            fn()
            record = {"error": None, "message": ""}
        except BaseException as exc:   # noqa: BLE001 -- everything is reported
            record = {"error": type(exc).__name__,
                      "bases": [c.__name__ for c in type(exc).__mro__],
                      "message": str(exc)[:2000]}
        record["index"] = index
        print(json.dumps(record), flush=True)


@pytest.fixture(scope="module")
def sweep():
    return _run_children()


def test_every_case_ran(sweep):
    assert set(sweep) == set(CASES)
    n_bad = sum(expect for _, expect, _ in CASES.values())
    print(f"\nbad-input sweep: {len(CASES)} cases, {n_bad} illegal inputs, "
          f"{len(CASES) - n_bad} legal edge cases")


@pytest.mark.parametrize("case_id", list(CASES))
def test_case(sweep, case_id):
    _, expect_error, mentions = CASES[case_id]
    result = sweep[case_id]
    if result["error"] == "CRASH":
        pytest.fail(f"{case_id}: {result['message']}")
    if not expect_error:
        assert result["error"] is None, f"{case_id}: {result['error']}: {result['message']}"
        return
    assert result["error"] is not None, f"{case_id}: no error raised"
    assert set(result["bases"]) & set(ALLOWED), \
        f"{case_id}: expected one of {ALLOWED}, got {result['error']}: {result['message']}"
    for pattern in mentions:
        assert re.search(pattern, result["message"]), \
            f"{case_id}: message {result['message']!r} does not match {pattern!r}"


if __name__ == "__main__":
    if "--count" in sys.argv:
        n_bad = sum(expect for _, expect, _ in CASES.values())
        print(f"{len(CASES)} cases: {n_bad} illegal inputs, {len(CASES) - n_bad} legal edge cases")
    else:
        _child(int(sys.argv[sys.argv.index("--start") + 1]) if "--start" in sys.argv else 0)
