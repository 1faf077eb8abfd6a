"""BatchNorm2d (train / eval, running statistics) and Dropout."""
import numpy as np
import pytest

import cyconv
from cyconv import nn

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, finite_difference

BN_SHAPES = [(2, 1, 1, 1), (1, 3, 2, 2), (2, 3, 5, 7), (3, 4, 6, 6), (4, 2, 1, 3), (3, 4, 12, 11)]


DEFAULT = object()   # a keyword left out (momentum=None is a setting of its own)


def _bn(C, dtype, rng, momentum=DEFAULT, eps=DEFAULT):
    kw = {}
    if momentum is not DEFAULT:
        kw["momentum"] = momentum
    if eps is not DEFAULT:
        kw["eps"] = eps
    layer = nn.BatchNorm2d(C, dtype=dtype, **kw)
    w, b = layer.parameters()
    w.data[...] = rng.uniform(0.5, 1.5, C)
    b.data[...] = rng.standard_normal(C)
    return layer


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def test_bn_init_and_state_dict():
    layer = nn.BatchNorm2d(3)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    np.testing.assert_array_equal(sd["weight"], np.ones(3))
    np.testing.assert_array_equal(sd["bias"], np.zeros(3))
    np.testing.assert_array_equal(sd["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(sd["running_var"], np.ones(3))
    assert sd["weight"].dtype == np.float32 and sd["running_var"].dtype == np.float32
    assert np.asarray(sd["num_batches_tracked"]).dtype == np.int64
    assert int(sd["num_batches_tracked"]) == 0
    assert layer.training
    assert len(layer.parameters()) == 2
    assert nn.BatchNorm2d(2, dtype=np.float64).state_dict()["running_mean"].dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_bn_train_forward_backward(shape, dtype, rng):
    C = shape[1]
    layer = _bn(C, dtype, rng)
    w, b = (p.data.copy() for p in layer.parameters())
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    x0 = x.copy()
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    ry, rm, rv = R.batch_norm2d_train_forward(x, w, b, np.zeros(C), np.ones(C))
    assert_close(y, ry, dtype, err_msg="y")
    sd = layer.state_dict()
    assert_close(sd["running_mean"], rm, dtype, err_msg="running_mean")
    assert_close(sd["running_var"], rv, dtype, err_msg="running_var")
    assert int(sd["num_batches_tracked"]) == 1
    dy = rng.standard_normal(shape).astype(dtype)
    dx = layer.backward(dy)
    rdx, rdw, rdb = R.batch_norm2d_train_backward(x, w, dy)
    assert dx.dtype == dtype and dx.shape == shape
    # dx of batch norm is a difference of sums: scale the tolerance by |dy| terms
    assert_close(dx, rdx, dtype, scale=max(1.0, float(np.abs(rdx).max()), float(np.abs(dy).max())),
                 err_msg="dx")
    assert_close(layer.parameters()[0].grad, rdw, dtype, err_msg="dweight")
    assert_close(layer.parameters()[1].grad, rdb, dtype, err_msg="dbias")
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("shape", [(2, 2, 3, 2), (1, 3, 2, 3), (3, 1, 2, 2)])
def test_bn_train_finite_differences(shape, rng):
    layer = _bn(shape[1], np.float64, rng)
    x = rng.standard_normal(shape)
    Rm = rng.standard_normal(shape)
    layer(x)
    dx = layer.backward(Rm)
    grads = [p.grad.copy() for p in layer.parameters()]
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * Rm).sum(), x), **FD_TOL)
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_allclose(g, finite_difference(lambda _: (layer(x) * Rm).sum(), p.data),
                                   **FD_TOL)


def test_reference_bn_backward_matches_finite_differences(rng):
    x = rng.standard_normal((2, 3, 2, 3))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    Rm = rng.standard_normal(x.shape)
    f = lambda x_, w_, b_: (R.batch_norm2d_train_forward(x_, w_, b_, np.zeros(3), np.ones(3))[0]
                            * Rm).sum()
    dx, dw, db = R.batch_norm2d_train_backward(x, w, Rm)
    np.testing.assert_allclose(dx, finite_difference(lambda v: f(v, w, b), x), **FD_TOL)
    np.testing.assert_allclose(dw, finite_difference(lambda v: f(x, v, b), w), **FD_TOL)
    np.testing.assert_allclose(db, finite_difference(lambda v: f(x, w, v), b), **FD_TOL)


@pytest.mark.parametrize("momentum", [DEFAULT, None, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_running_stats_over_several_batches(momentum, dtype, rng):
    """momentum left out: 0.1; None: a cumulative average (momentum 1/k at batch k)."""
    C = 3
    layer = _bn(C, dtype, rng, momentum=momentum)
    assert layer.momentum == (0.1 if momentum is DEFAULT else momentum)
    w, b = (p.data.copy() for p in layer.parameters())
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(1, 5):
        m = {DEFAULT: 0.1, None: 1 / step}.get(momentum, momentum)
        x = (rng.standard_normal((2, C, 3, 4)) * (step + 1) + step).astype(dtype)
        y = layer(x)
        ry, rm, rv = R.batch_norm2d_train_forward(x, w, b, rm, rv, momentum=m)
        assert_close(y, ry, dtype)
        sd = layer.state_dict()
        assert_close(sd["running_mean"], rm, dtype, err_msg="running_mean")
        assert_close(sd["running_var"], rv, dtype, err_msg="running_var (unbiased)")
        assert int(sd["num_batches_tracked"]) == step


def test_bn_running_var_is_unbiased():
    # one channel, values 0 and 2: biased var 1, unbiased var 2
    layer = nn.BatchNorm2d(1, momentum=1.0, dtype=np.float64)
    layer(np.array([[[[0.0]]], [[[2.0]]]]))
    sd = layer.state_dict()
    np.testing.assert_allclose(sd["running_mean"], [1.0])
    np.testing.assert_allclose(sd["running_var"], [2.0])


def _sum_in_eight_lanes(terms):
    """sum_run's order (cyconv/_runs.h): lane j sums terms j, j + 8, ... in turn, the
    tail goes to lane 0, then the lanes are added as a fixed tree."""
    whole = len(terms) - len(terms) % 8
    lanes = np.zeros(8)
    for row in terms[:whole].reshape(-1, 8):
        lanes = lanes + row
    for value in terms[whole:]:
        lanes[0] = lanes[0] + value
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5])
                                                                + (lanes[6] + lanes[7]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_relu", [False, True])
def test_bn_sums_are_rounded_in_their_fixed_order(dtype, fused_relu, rng):
    """The batch statistics and the parameter gradients are sums in double precision in an
    order fixed by the shapes (per plane, 8 lanes), with every product rounded on its own
    (no fused multiply-add in any CPU's version of the kernels): they equal that order's
    sums bit for bit, for float32 and float64 inputs, and with a ReLU fused after the
    batch norm (whose mask then applies to the gradient first)."""
    n, c, h, w = 3, 2, 5, 7          # planes of 35: four whole rows of lanes and a tail
    x = (rng.standard_normal((n, c, h, w)) * 3 + 10).astype(dtype)
    dy = rng.standard_normal((n, c, h, w)).astype(dtype)
    layer = nn.BatchNorm2d(c, momentum=1.0, dtype=dtype)
    layer.bias.data[:] = [0.0, 0.3]  # ReLU's mask keeps about half of each channel
    model = nn.Sequential(layer, nn.ReLU()) if fused_relu else layer
    out = model(x)
    model.backward(dy)
    if fused_relu:
        dy = np.where(out > 0, dy, 0).astype(dtype)
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    count = n * h * w
    for ch in range(c):
        planes, grads = x[:, ch].reshape(n, -1), dy[:, ch].reshape(n, -1)
        total = 0.0
        for plane in planes:
            total = total + _sum_in_eight_lanes(plane)
        mean = total / count
        squares = products = sum_dy = 0.0
        for plane, grad in zip(planes, grads):
            squares = squares + _sum_in_eight_lanes((plane - mean) * (plane - mean))
            products = products + _sum_in_eight_lanes(grad * (plane - np.float64(dtype(mean))))
            sum_dy = sum_dy + _sum_in_eight_lanes(grad)
        var = squares / count
        invstd = 1.0 / np.sqrt(var + layer.eps)
        assert layer.running_mean[ch] == dtype(mean)
        assert layer.running_var[ch] == dtype(var * count / (count - 1))
        assert layer.weight.grad[ch] == dtype(products * np.float64(dtype(invstd)))
        assert layer.bias.grad[ch] == dtype(sum_dy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_eval_uses_running_stats(dtype, rng):
    C = 3
    layer = _bn(C, dtype, rng, eps=1e-3)
    with cyconv.no_grad():   # train mode: the running statistics move
        for _ in range(3):
            layer((rng.standard_normal((3, C, 4, 4)) * 3 + 1).astype(dtype))
    sd = _state(layer)
    x = (rng.standard_normal((2, C, 5, 3)) * 3 + 1).astype(dtype)
    with cyconv.no_grad():
        y_train = layer(x)
    sd = _state(layer)  # includes the update made by x
    layer.eval()
    assert not layer.training
    y_eval = layer(x)
    assert y_eval.dtype == dtype
    assert_close(y_eval, R.batch_norm2d_eval_forward(x, sd["weight"], sd["bias"],
                                                     sd["running_mean"], sd["running_var"],
                                                     eps=1e-3), dtype)
    assert not np.allclose(y_eval, y_train, atol=1e-3)
    after = layer.state_dict()
    for k in sd:  # eval mode changes no buffer
        np.testing.assert_array_equal(after[k], sd[k])
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer.zero_grad()
    dx = layer.backward(dy)
    rdx, rdw, rdb = R.batch_norm2d_eval_backward(x, sd["weight"], sd["running_mean"],
                                                 sd["running_var"], dy, eps=1e-3)
    assert_close(dx, rdx, dtype, err_msg="dx")
    assert_close(layer.parameters()[0].grad, rdw, dtype, err_msg="dweight")
    assert_close(layer.parameters()[1].grad, rdb, dtype, err_msg="dbias")
    layer.train()
    assert layer.training
    assert_close(layer(x), R.batch_norm2d_train_forward(x, sd["weight"], sd["bias"],
                                                        sd["running_mean"], sd["running_var"],
                                                        eps=1e-3)[0], dtype)


def test_bn_eval_finite_differences(rng):
    layer = _bn(2, np.float64, rng)
    with cyconv.no_grad():
        layer(rng.standard_normal((3, 2, 3, 3)) + 2)
    layer.eval()
    x = rng.standard_normal((2, 2, 2, 3))
    Rm = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(Rm)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * Rm).sum(), x), **FD_TOL)


def test_bn_param_grads_accumulate(rng):
    layer = _bn(2, np.float64, rng)
    x = rng.standard_normal((2, 2, 3, 3))
    dy = rng.standard_normal(x.shape)
    layer.zero_grad()
    layer(x)
    layer.backward(dy)
    g1 = [p.grad.copy() for p in layer.parameters()]
    layer(x)
    layer.backward(dy)
    for p, g in zip(layer.parameters(), g1):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-12, atol=1e-14)


def test_bn_matches_torch(rng):
    torch = pytest.importorskip("torch")
    layer = _bn(3, np.float64, rng)
    tbn = torch.nn.BatchNorm2d(3).double()
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    for _ in range(3):
        x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        ty = tbn(tx)
        y = layer(x)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        dy = rng.standard_normal(x.shape)
        ty.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    for k, v in tbn.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[k], v.numpy(), rtol=1e-10, err_msg=k)
    np.testing.assert_allclose(layer.parameters()[0].grad, tbn.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(layer.parameters()[1].grad, tbn.bias.grad.numpy(), rtol=1e-10)


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics(p, dtype):
    layer = nn.Dropout(p, seed=123)
    n = 400_000
    x = np.ones((8, 5, 100, 100), dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    zero = y == 0
    frac = zero.mean()
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 6 * sigma, (frac, p)
    np.testing.assert_allclose(y[~zero], 1.0 / (1.0 - p), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 6 * sigma / (1 - p)
    # the mask is not a fixed pattern (e.g. not the same for every channel)
    assert not np.array_equal(zero[0, 0], zero[0, 1])
    assert not np.array_equal(zero[0], zero[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_backward_uses_same_mask(dtype, rng):
    p = 0.4
    layer = nn.Dropout(p, seed=5)
    x = (rng.uniform(0.5, 1.5, (3, 4, 7, 6)) * rng.choice([-1, 1], (3, 4, 7, 6))).astype(dtype)
    y = layer(x)
    keep = y != 0
    np.testing.assert_allclose(y[keep], x[keep] / (1 - p), rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, np.where(keep, dy / (1 - p), 0), rtol=1e-6, atol=0)


def test_dropout_2d_input(rng):
    layer = nn.Dropout(0.5, seed=0)
    x = rng.uniform(1, 2, (64, 50))
    y = layer(x)
    keep = y != 0
    assert 0.35 < keep.mean() < 0.65
    np.testing.assert_allclose(y[keep], 2 * x[keep], rtol=1e-12)
    np.testing.assert_allclose(layer.backward(np.ones_like(x)), 2.0 * keep, rtol=1e-12)


def test_dropout_same_seed_same_mask(rng):
    x = rng.uniform(1, 2, (4, 3, 8, 8))
    a, b = nn.Dropout(0.5, seed=42), nn.Dropout(0.5, seed=42)
    ya1, yb1 = a(x), b(x)
    np.testing.assert_array_equal(ya1, yb1)
    ya2, yb2 = a(x), b(x)
    np.testing.assert_array_equal(ya2, yb2)
    assert not np.array_equal(ya1, ya2)  # a fresh mask per call
    c = nn.Dropout(0.5, seed=43)
    assert not np.array_equal(c(x), ya1)


def test_dropout_manual_seed(rng):
    x = rng.uniform(1, 2, (4, 3, 8, 8))
    cyconv.manual_seed(3)
    a = nn.Dropout(0.5)
    ya = a(x)
    cyconv.manual_seed(3)
    b = nn.Dropout(0.5)
    np.testing.assert_array_equal(ya, b(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_eval_and_p0_are_identity(dtype, rng):
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer = nn.Dropout(0.7, seed=1)
    layer.eval()
    assert not layer.training
    y = layer(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    z = nn.Dropout(0.0, seed=1)
    assert z.training
    np.testing.assert_array_equal(z(x), x)
    np.testing.assert_array_equal(z.backward(dy), dy)
    layer.train()
    assert np.any(layer(x) == 0)


def test_dropout_default_p_is_half(rng):
    layer = nn.Dropout(seed=0)
    y = layer(np.ones((100, 100)))
    assert 0.45 < (y == 0).mean() < 0.55
    np.testing.assert_allclose(y[y != 0], 2.0)
