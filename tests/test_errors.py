"""Invalid inputs raise clear errors; non-contiguous inputs just work."""
import re

import numpy as np
import pytest

from cyconv import nn, optim

from conftest import assert_msg_mentions, shape_regex


def _msg(ei):
    return str(ei.value)


# ----------------------------------------------------------------------------
# wrong number of dimensions
# ----------------------------------------------------------------------------
FOUR_D_LAYERS = {
    "conv": lambda: nn.Conv2d(3, 2, 3),
    "bn": lambda: nn.BatchNorm2d(3),
    "maxpool": lambda: nn.MaxPool2d(2),
    "avgpool": lambda: nn.AvgPool2d(2),
    "gap": lambda: nn.AdaptiveAvgPool2d(1),
}


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 8, 8, 1), (24,)])
@pytest.mark.parametrize("name", list(FOUR_D_LAYERS))
def test_wrong_ndim_4d_layers(name, shape):
    layer = FOUR_D_LAYERS[name]()
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError) as ei:
        layer(x)
    msg = _msg(ei)
    # the expected layout (4 dimensions / "(N, C, H, W)") and the actual shape
    assert "4" in msg or re.search(r"N\W+\w+\W+H\W+W", msg), msg
    assert re.search(shape_regex(shape), msg), msg


@pytest.mark.parametrize("shape", [(5,), (2, 5, 1, 1), (2, 3, 5)])
def test_wrong_ndim_linear(shape):
    with pytest.raises(ValueError) as ei:
        nn.Linear(5, 2)(np.zeros(shape, np.float32))
    msg = _msg(ei)
    assert "2" in msg.replace(str(shape), "") or re.search(r"\(N\W+5\)", msg), msg
    assert re.search(shape_regex(shape), msg), msg


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_wrong_ndim_loss(shape):
    with pytest.raises(ValueError):
        nn.CrossEntropyLoss()(np.zeros(shape), np.zeros(shape[0], np.int64))


# ----------------------------------------------------------------------------
# wrong channel / feature count
# ----------------------------------------------------------------------------
def test_wrong_channels_conv():
    with pytest.raises(ValueError) as ei:
        nn.Conv2d(3, 2, 3)(np.zeros((2, 5, 8, 8), np.float32))
    assert_msg_mentions(ei, "3", "5")


def test_wrong_channels_bn():
    with pytest.raises(ValueError) as ei:
        nn.BatchNorm2d(4)(np.zeros((2, 6, 3, 3), np.float32))
    assert_msg_mentions(ei, "4", "6")


def test_wrong_features_linear():
    with pytest.raises(ValueError) as ei:
        nn.Linear(7, 2)(np.zeros((3, 6), np.float32))
    assert_msg_mentions(ei, "7", "6")


def test_wrong_features_in_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(ValueError) as ei:
        model(np.zeros((1, 3, 7, 7), np.float32))  # flattens to 100, not 64
    assert_msg_mentions(ei, "64", "100")


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------
BAD_DTYPES = [np.int64, np.int32, np.float16, object, np.bool_, np.complex128]
PARAM_LAYERS = {
    "conv": (lambda d: nn.Conv2d(2, 2, 1, dtype=d), (1, 2, 3, 3)),
    "bn": (lambda d: nn.BatchNorm2d(2, dtype=d), (2, 2, 3, 3)),
    "linear": (lambda d: nn.Linear(2, 2, dtype=d), (1, 2)),
}
STATELESS = {
    "relu": (nn.ReLU, (1, 2, 3, 3)),
    "leaky": (nn.LeakyReLU, (1, 2, 3, 3)),
    "maxpool": (lambda: nn.MaxPool2d(2), (1, 2, 4, 4)),
    "avgpool": (lambda: nn.AvgPool2d(2), (1, 2, 4, 4)),
    "gap": (lambda: nn.AdaptiveAvgPool2d(1), (1, 2, 4, 4)),
    "dropout": (lambda: nn.Dropout(0.5, seed=0), (1, 2, 4, 4)),
    "flatten": (nn.Flatten, (1, 2, 4, 4)),
}


def _dtype_name(d):
    return np.dtype(d).name


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("name", list(PARAM_LAYERS))
def test_bad_dtype_param_layers(name, bad):
    factory, shape = PARAM_LAYERS[name]
    x = np.ones(shape, dtype=bad)
    with pytest.raises(TypeError) as ei:
        factory(np.float32)(x)
    assert_msg_mentions(ei, "float32", _dtype_name(bad))


@pytest.mark.parametrize("layer_dtype,x_dtype", [(np.float32, np.float64),
                                                 (np.float64, np.float32)])
@pytest.mark.parametrize("name", list(PARAM_LAYERS))
def test_dtype_mismatch_param_layers(name, layer_dtype, x_dtype):
    factory, shape = PARAM_LAYERS[name]
    with pytest.raises(TypeError) as ei:
        factory(layer_dtype)(np.ones(shape, dtype=x_dtype))
    assert_msg_mentions(ei, _dtype_name(layer_dtype), _dtype_name(x_dtype))


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("name", list(STATELESS))
def test_bad_dtype_stateless_layers(name, bad):
    factory, shape = STATELESS[name]
    with pytest.raises(TypeError) as ei:
        factory()(np.ones(shape, dtype=bad))
    assert_msg_mentions(ei, _dtype_name(bad))


@pytest.mark.parametrize("bad", [np.float16, np.int64, object])
def test_bad_layer_dtype_argument(bad):
    for make in (lambda: nn.Conv2d(2, 2, 1, dtype=bad), lambda: nn.Linear(2, 2, dtype=bad),
                 lambda: nn.BatchNorm2d(2, dtype=bad)):
        with pytest.raises((TypeError, ValueError)):
            make()


@pytest.mark.parametrize("bad", [np.int64, np.float16, object])
def test_bad_dtype_loss_logits(bad):
    with pytest.raises(TypeError):
        nn.CrossEntropyLoss()(np.ones((2, 3), dtype=bad), np.array([0, 1]))


def test_python_list_input_rejected_or_converted():
    # a list is not an ndarray of the right dtype: either refuse with TypeError
    # or convert; it must not crash or silently produce garbage
    layer = nn.Linear(2, 1, dtype=np.float64, seed=0)
    try:
        y = layer([[1.0, 2.0]])
    except (TypeError, ValueError):
        return
    np.testing.assert_allclose(y, layer(np.array([[1.0, 2.0]])))


# ----------------------------------------------------------------------------
# spatial size too small
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(1, 1, 5), (1, 1, 3, 3)),
    (lambda: nn.Conv2d(1, 1, (1, 5), padding=(0, 1)), (1, 1, 3, 2)),
    (lambda: nn.Conv2d(1, 1, 3, dilation=3), (1, 1, 6, 6)),   # effective kernel 7 > 6
    (lambda: nn.MaxPool2d(3), (1, 1, 2, 5)),
    (lambda: nn.AvgPool2d(4, padding=1), (1, 1, 8, 1)),
])
def test_input_smaller_than_kernel(make, shape):
    with pytest.raises(ValueError) as ei:
        make()(np.zeros(shape, np.float32))
    msg = _msg(ei)
    # the offending spatial size is mentioned
    assert any(str(s) in msg for s in shape[2:]), msg


# ----------------------------------------------------------------------------
# backward misuse
# ----------------------------------------------------------------------------
BACKWARD_LAYERS = {
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    "linear": (lambda: nn.Linear(4, 3), (2, 4)),
    "bn": (lambda: nn.BatchNorm2d(2), (2, 2, 3, 3)),
    "maxpool": (lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    "avgpool": (lambda: nn.AvgPool2d(2), (2, 2, 4, 4)),
    "gap": (lambda: nn.AdaptiveAvgPool2d(1), (2, 2, 4, 4)),
    "relu": (nn.ReLU, (2, 2, 3, 3)),
    "leaky": (nn.LeakyReLU, (2, 2, 3, 3)),
    "dropout": (lambda: nn.Dropout(0.5, seed=0), (2, 2, 3, 3)),
    "flatten": (nn.Flatten, (2, 2, 3, 3)),
    "sequential": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()), (2, 2, 3, 3)),
}


@pytest.mark.parametrize("name", list(BACKWARD_LAYERS))
def test_backward_before_forward(name):
    factory, shape = BACKWARD_LAYERS[name]
    layer = factory()
    with pytest.raises(RuntimeError):
        layer.backward(np.ones(shape, np.float32))


def test_loss_backward_before_forward():
    with pytest.raises(RuntimeError):
        nn.CrossEntropyLoss().backward()


@pytest.mark.parametrize("name", list(BACKWARD_LAYERS))
def test_backward_wrong_grad_shape(name):
    factory, shape = BACKWARD_LAYERS[name]
    layer = factory()
    y = layer(np.ones(shape, np.float32))
    bad = tuple(s + 1 for s in y.shape)
    with pytest.raises(ValueError) as ei:
        layer.backward(np.ones(bad, np.float32))
    assert_msg_mentions(ei, tuple(y.shape), bad)


def test_backward_wrong_grad_ndim():
    layer = nn.Conv2d(2, 3, 3)
    y = layer(np.ones((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError):
        layer.backward(np.ones(y.shape[1:], np.float32))


# ----------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("labels,mention", [
    (np.array([0, 3, 1]), "3"),        # == num classes
    (np.array([0, 7, 1]), "7"),
    (np.array([0, -1, 1]), "-1"),
])
def test_labels_out_of_range(labels, mention):
    with pytest.raises(ValueError) as ei:
        nn.CrossEntropyLoss()(np.zeros((3, 3)), labels)
    assert_msg_mentions(ei, re.escape(mention))


@pytest.mark.parametrize("n", [2, 4])
def test_labels_wrong_length(n):
    with pytest.raises(ValueError) as ei:
        nn.CrossEntropyLoss()(np.zeros((3, 5)), np.zeros(n, np.int64))
    assert_msg_mentions(ei, "3", str(n))


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, 2.0]),
                                    np.array(["a", "b", "c"]), np.array([0, 1, 2], dtype=object)])
def test_labels_not_integer(labels):
    with pytest.raises((TypeError, ValueError)):
        nn.CrossEntropyLoss()(np.zeros((3, 3)), labels)


def test_labels_wrong_ndim():
    with pytest.raises(ValueError):
        nn.CrossEntropyLoss()(np.zeros((3, 3)), np.zeros((3, 1), np.int64))


# ----------------------------------------------------------------------------
# constructor arguments
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 2, 0),
    lambda: nn.Conv2d(3, 2, 3, stride=0),
    lambda: nn.Conv2d(3, 2, 3, padding=-1),
    lambda: nn.Conv2d(3, 2, 3, dilation=0),
    lambda: nn.Conv2d(0, 2, 3),
    lambda: nn.Linear(0, 2),
    lambda: nn.MaxPool2d(0),
    lambda: nn.MaxPool2d(2, stride=0),
    lambda: nn.AvgPool2d(2, padding=-1),
    lambda: nn.Dropout(1.5),
    lambda: nn.Dropout(-0.1),
    lambda: nn.CrossEntropyLoss(label_smoothing=1.5),
])
def test_invalid_constructor_arguments(make):
    with pytest.raises((ValueError, TypeError)):
        make()


# ----------------------------------------------------------------------------
# single-layer load_state_dict
# ----------------------------------------------------------------------------
def test_layer_load_state_dict_wrong_shape():
    layer = nn.Conv2d(3, 4, 3)
    sd = layer.state_dict()
    sd["weight"] = np.zeros((4, 3, 2, 2), np.float32)
    with pytest.raises((ValueError, RuntimeError)) as ei:
        layer.load_state_dict(sd)
    assert_msg_mentions(ei, "weight", (4, 3, 3, 3), (4, 3, 2, 2))


def test_layer_load_state_dict_missing_and_unexpected():
    layer = nn.BatchNorm2d(3)
    sd = layer.state_dict()
    del sd["running_mean"]
    with pytest.raises((KeyError, ValueError, RuntimeError)) as ei:
        layer.load_state_dict(sd)
    assert_msg_mentions(ei, "running_mean")
    sd = layer.state_dict()
    sd["extra"] = np.zeros(3, np.float32)
    with pytest.raises((KeyError, ValueError, RuntimeError)) as ei:
        layer.load_state_dict(sd)
    assert_msg_mentions(ei, "extra")


# ----------------------------------------------------------------------------
# non-contiguous inputs work
# ----------------------------------------------------------------------------
def _views(rng, shape, dtype):
    """Several non-contiguous arrays of the given logical shape."""
    N, C, H, W = shape
    big = rng.standard_normal((N, C, 2 * H, 2 * W)).astype(dtype)
    yield "strided", big[:, :, ::2, ::2]
    yield "transposed", rng.standard_normal((N, C, W, H)).astype(dtype).transpose(0, 1, 3, 2)
    yield "fortran", np.asfortranarray(rng.standard_normal(shape).astype(dtype))
    yield "reversed", rng.standard_normal(shape).astype(dtype)[:, ::-1, :, ::-1]
    yield "channel_slice", rng.standard_normal((N, C + 2, H, W)).astype(dtype)[:, 1:-1]


NC_LAYERS = {
    "conv": lambda d: nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1, dtype=d, seed=0),
    "conv_1x1": lambda d: nn.Conv2d(3, 2, 1, dtype=d, seed=0),
    "bn": lambda d: nn.BatchNorm2d(3, dtype=d),
    "maxpool": lambda d: nn.MaxPool2d(3, stride=2, padding=1),
    "avgpool": lambda d: nn.AvgPool2d(2),
    "gap": lambda d: nn.AdaptiveAvgPool2d(1),
    "relu": lambda d: nn.ReLU(),
    "leaky": lambda d: nn.LeakyReLU(0.2),
    "flatten": lambda d: nn.Flatten(),
    "dropout": lambda d: nn.Dropout(0.5, seed=4),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(NC_LAYERS))
def test_non_contiguous_inputs(name, dtype, rng):
    shape = (2, 3, 6, 5)
    for kind, x in _views(rng, shape, dtype):
        assert x.shape == shape and not x.flags.c_contiguous, kind
        xc = np.ascontiguousarray(x)
        a, b = NC_LAYERS[name](dtype), NC_LAYERS[name](dtype)
        ya, yb = a(x), b(xc)
        np.testing.assert_array_equal(ya, yb, err_msg=kind)
        # a non-contiguous upstream gradient too
        g = rng.standard_normal(ya.shape[::-1]).astype(dtype).T
        np.testing.assert_array_equal(a.backward(g), b.backward(np.ascontiguousarray(g)),
                                      err_msg=kind)
        for pa, pb in zip(a.parameters(), b.parameters()):
            np.testing.assert_array_equal(pa.grad, pb.grad, err_msg=kind)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_linear_and_loss(dtype, rng):
    xt = rng.standard_normal((6, 4)).astype(dtype).T          # (4, 6), F-ordered
    a = nn.Linear(6, 3, dtype=dtype, seed=0)
    b = nn.Linear(6, 3, dtype=dtype, seed=0)
    ya, yb = a(xt), b(np.ascontiguousarray(xt))
    np.testing.assert_array_equal(ya, yb)
    g = rng.standard_normal((3, 4)).astype(dtype).T
    np.testing.assert_array_equal(a.backward(g), b.backward(np.ascontiguousarray(g)))
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.grad, pb.grad)
    z = rng.standard_normal((5, 8)).astype(dtype)[:, ::2]
    labels = np.array([0, 1, 2, 3, 0, 1])[:5]
    la, lb = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    assert la(z, labels[::-1]) == lb(np.ascontiguousarray(z), np.ascontiguousarray(labels[::-1]))
    np.testing.assert_array_equal(la.backward(), lb.backward())


def _some_params():
    return nn.Linear(3, 2, dtype=np.float64, seed=0).parameters()


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=-0.1),
    lambda p: optim.SGD(p, lr=0.1, momentum=-0.5),
    lambda p: optim.SGD(p, lr=0.1, weight_decay=-1.0),
    lambda p: optim.SGD(p, lr=0.1, nesterov=True),                            # needs momentum
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, nesterov=True),  # and no dampening
    lambda p: optim.Adam(p, lr=-1e-3),
    lambda p: optim.Adam(p, betas=(1.0, 0.999)),
    lambda p: optim.Adam(p, betas=(0.9, -0.1)),
    lambda p: optim.Adam(p, eps=-1e-8),
    lambda p: optim.AdamW(p, weight_decay=-0.1),
])
def test_invalid_optimizer_arguments(make):
    """Same validation as torch.optim (ValueError)."""
    with pytest.raises(ValueError):
        make(_some_params())


def test_batchnorm_train_needs_more_than_one_value_per_channel():
    # PyTorch: "Expected more than 1 value per channel when training"
    layer = nn.BatchNorm2d(3)
    with pytest.raises(ValueError) as ei:
        layer(np.zeros((1, 3, 1, 1), np.float32))
    assert_msg_mentions(ei, (1, 3, 1, 1))
    layer.eval()
    layer(np.zeros((1, 3, 1, 1), np.float32))  # fine with running statistics


@pytest.mark.parametrize("make", [lambda: nn.MaxPool2d(2, padding=2),
                                  lambda: nn.AvgPool2d(3, padding=2)])
def test_pool_padding_larger_than_half_kernel(make):
    # PyTorch: "pad should be at most half of effective kernel size"
    with pytest.raises(ValueError):
        make()(np.zeros((1, 1, 8, 8), np.float32))


def test_dropout_p_one_zeroes_everything(rng):
    layer = nn.Dropout(1.0, seed=0)
    x = rng.standard_normal((2, 3, 4, 4))
    y = layer(x)
    assert np.all(y == 0) and np.all(np.isfinite(y))
    dx = layer.backward(np.ones_like(x))
    assert np.all(dx == 0) and np.all(np.isfinite(dx))
