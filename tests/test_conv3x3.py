"""Conv2d's Winograd F(4x4, 3x3) path (3x3, stride 1): forward and both gradients against
the numpy reference, finite differences, PyTorch, fused ReLU and thread invariance."""
import numpy as np
import pytest

import cyconv
from cyconv import _winograd, nn
from cyconv.nn import winograd

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, finite_difference, num_threads

# (N, C, M, H, W, padding, bias): odd and even sizes, paddings 0-3, channel counts
# 1, 3 and ones that are not multiples of the vector width or the channel blocks.
CASES = [
    (1, 1, 1, 5, 5, 1, True),
    (2, 3, 5, 7, 9, (0, 1), False),
    (3, 17, 10, 11, 6, (1, 0), True),
    (2, 24, 24, 16, 16, 1, False),
    (1, 2, 3, 3, 3, 2, True),
    (2, 5, 9, 4, 13, 3, True),
    (1, 9, 33, 1, 8, 1, True),
    (4, 8, 12, 3, 3, 0, False),
    (2, 40, 19, 9, 7, 1, True),
    # more tiles than the transforms gather at a time (64), a block ending mid-row
    (3, 8, 8, 30, 22, 1, True),
    # padding 4: tiles that start past the image (and negative padding backward)
    (1, 3, 4, 2, 5, 4, True),
    # rows wide enough for the whole-vector splits and interleaves (16 tiles)
    (1, 3, 5, 5, 70, 1, True),
]


def _id(case):
    n, c, m, h, w, p, b = case
    return f"n{n}c{c}m{m}_{h}x{w}_p{p}_{'b' if b else 'nb'}".replace(" ", "")


@pytest.fixture(autouse=True, params=["own product", "BLAS product"])
def every_channel_count(request, monkeypatch):
    """The path also takes the thin layers it leaves to im2col by default; the weight
    gradient by cyconv's own product (thin layers) or by BLAS (the others), each test
    once with each."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "THIN_PRODUCT", 10**9 if request.param == "own product" else 0)


def make(case, dtype, fuse_relu=False, seed=0):
    _, c, m, _, _, p, bias = case
    layer = nn.Conv2d(c, m, 3, padding=p, bias=bias, dtype=dtype, seed=seed, fuse_relu=fuse_relu)
    assert winograd.applies(layer)
    return layer


def inputs(case, dtype, rng):
    n, c, _, h, w, _, _ = case
    return rng.standard_normal((n, c, h, w)).astype(dtype)


def reference(layer, x, dy):
    """(y, dx, dW, db) of the float64 reference."""
    b = layer.bias.data if layer.bias is not None else None
    y = R.conv2d_forward(x, layer.weight.data, b, padding=layer.padding)
    dx, dw, db = R.conv2d_backward(x, layer.weight.data, dy, padding=layer.padding,
                                   bias=b is not None)
    return y, dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, dtype, rng):
    layer = make(case, dtype)
    x = inputs(case, dtype, rng)
    y = layer(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ry, rdx, rdw, rdb = reference(layer, x, dy)
    assert y.dtype == dtype
    assert_close(y, ry, dtype, err_msg="y")
    dx = layer.backward(dy)
    assert dx.dtype == dtype
    assert_close(dx, rdx, dtype, err_msg="dx")
    assert_close(layer.weight.grad, rdw, dtype, err_msg="dW")
    if layer.bias is not None:
        assert_close(layer.bias.grad, rdb, dtype, err_msg="db")


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], (1, 2, 2, 3, 5, 0, True)],
                         ids=_id)
def test_gradients_match_finite_differences(case, rng):
    layer = make(case, np.float64)
    x = inputs(case, np.float64, rng)
    y = layer(x)
    projection = rng.standard_normal(y.shape)
    dx = layer.backward(projection)

    def loss(v):
        with cyconv.no_grad():
            return float((layer(v) * projection).sum())

    np.testing.assert_allclose(dx, finite_difference(loss, x), **FD_TOL)
    for p in layer.parameters():
        np.testing.assert_allclose(p.grad, finite_difference(lambda _: loss(x), p.data), **FD_TOL)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[8]], ids=_id)
def test_fused_relu_equals_conv_then_relu(case, rng):
    fused, plain, relu = make(case, np.float64, fuse_relu=True), make(case, np.float64), nn.ReLU()
    x = inputs(case, np.float64, rng)
    y = fused(x)
    np.testing.assert_allclose(y, relu(plain(x)), rtol=1e-12, atol=1e-14)
    assert (y == 0).any() and (y > 0).any()
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(relu.backward(dy)),
                               rtol=1e-12, atol=1e-14)
    for pf, pp in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(pf.grad, pp.grad, rtol=1e-12, atol=1e-14)


def run(case, dtype, x, dy):
    layer = make(case, dtype)
    y = layer(x).copy()
    dx = layer.backward(dy).copy()
    return [y, dx] + [p.grad.copy() for p in layer.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_for_any_thread_count(dtype, rng, monkeypatch):
    """Several tile ranges per call (small budgets), ranges spanning images."""
    monkeypatch.setattr(winograd, "FORWARD_BYTES", 16 * 64 * 32 * 8)
    monkeypatch.setattr(winograd, "GRAD_BYTES", 16 * 64 * 32 * 8)
    monkeypatch.setattr(winograd, "THIN_GRAD_BYTES", 16 * 64 * 32 * 8)
    case = (5, 19, 21, 9, 11, 1, True)
    x = inputs(case, dtype, rng)
    dy = rng.standard_normal((5, 21, 9, 11)).astype(dtype)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(run(case, dtype, x, dy))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_same_bits_for_both_vector_widths(case, dtype, rng):
    """The kernels' 64-byte (AVX-512) and 32-byte (AVX2) register blocks compute
    each element alike: whichever the CPU picks, the results are the same."""
    x = inputs(case, dtype, rng)
    layer = make(case, dtype)
    dy = rng.standard_normal(layer(x).shape).astype(dtype)
    results = {}
    try:
        for width in (32, 64):
            _winograd.force_vector_width(width)
            results[width] = run(case, dtype, x, dy)
    finally:
        _winograd.force_vector_width(None)
    for a, b in zip(results[32], results[64]):
        np.testing.assert_array_equal(a, b)


def test_force_vector_width_refuses_other_widths():
    with pytest.raises(ValueError, match="_winograd.force_vector_width: expected None, 32 or 64, got 16"):
        _winograd.force_vector_width(16)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("rows", [1, 48, 1024])
@pytest.mark.parametrize("tiles", [1, 31, 33, 100, 128, 1000, 6272, 50000])
def test_tile_ranges_are_whole_blocks_of_equal_length(tiles, rows, itemsize):
    """Ranges of whole TILE_BLOCKs, within the budget when a block fits it, and padded by
    less than a block each on average: the last range is not mostly padding."""
    block = _winograd.TILE_BLOCK
    for budget in (winograd.FORWARD_BYTES, winograd.GRAD_BYTES):
        span = winograd.tile_range(tiles, rows, itemsize, budget)
        ranges = -(-tiles // span)
        assert span % block == 0 and block <= span <= winograd.MAX_RANGE + block
        assert ranges * span - tiles < ranges * block
        fit = budget // (_winograd.POSITIONS * rows * itemsize)
        assert span < max(fit, block) + block


def test_parameter_gradients_accumulate(rng):
    case = CASES[3]
    layer = make(case, np.float64)
    x = inputs(case, np.float64, rng)
    dy = rng.standard_normal((2, 24, 16, 16))
    layer(x)
    layer.backward(dy)
    once = layer.weight.grad.copy()
    layer(x)
    assert layer.backward(dy, input_grad=False) is None
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-14)


def test_dispatch(monkeypatch):
    monkeypatch.undo()
    assert winograd.applies(nn.Conv2d(24, 48, 3, padding=1))
    assert winograd.applies(nn.Conv2d(8, 8, 3))
    assert not winograd.applies(nn.Conv2d(3, 24, 3, padding=1))      # thin: im2col
    assert not winograd.applies(nn.Conv2d(24, 48, 3, stride=2, padding=1))
    assert not winograd.applies(nn.Conv2d(24, 48, 3, padding=2, dilation=2))
    assert not winograd.applies(nn.Conv2d(24, 48, 3, padding=1, groups=2))
    assert not winograd.applies(nn.Conv2d(24, 48, (3, 1), padding=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(2, 24, 48, 17, 17, 1, True), (3, 48, 20, 8, 9, 0, False),
                                  (1, 64, 64, 14, 14, 1, False)], ids=_id)
def test_matches_torch(case, dtype, rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    layer = make(case, dtype)
    tconv = torch.nn.Conv2d(case[1], case[2], 3, padding=case[5], bias=case[6],
                            dtype=torch.float32 if dtype == np.float32 else torch.float64)
    with torch.no_grad():
        for p, q in zip(layer.parameters(), tconv.parameters()):
            q.copy_(torch.from_numpy(p.data))
    x = inputs(case, dtype, rng)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tconv(tx)
    y = layer(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(dy))
    tol = 2e-4 if dtype == np.float32 else 1e-10  # relative; absolute scaled by the size
    pairs = [(y, ty.detach().numpy()), (layer.backward(dy), tx.grad.numpy())] + [
        (p.grad, q.grad.numpy()) for p, q in zip(layer.parameters(), tconv.parameters())]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs, rtol=tol,
                                   atol=tol * max(1.0, float(np.abs(theirs).max())))
