"""Grouped and depthwise Conv2d: against the numpy reference (float32 and float64), central
finite differences (float64), PyTorch, thread invariance and bad input.

Depthwise layers (groups == in_channels) run both their own kernels (_depthwise.pyx)
and the grouped im2col + GEMM path (the `path` fixture); other grouped layers run
im2col + GEMM."""
import numpy as np
import pytest

import cyconv
from cyconv import _depthwise, nn
from cyconv.nn import conv as conv_module

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, assert_msg_mentions, finite_difference


def _case(N, C, O, H, W, k, s=1, p=0, d=1, groups=1, bias=True):
    return dict(N=N, C=C, O=O, H=H, W=W, k=R.pair(k), s=R.pair(s), p=R.pair(p), d=R.pair(d),
                groups=groups, bias=bias)


CASES = [
    _case(2, 4, 6, 7, 9, k=3, p=1, groups=2),                              # groups 2
    _case(3, 6, 3, 9, 8, k=(2, 3), s=(2, 1), p=(1, 0), groups=3),          # 2 in -> 1 out
    _case(1, 4, 8, 11, 10, k=(3, 1), s=3, d=(2, 1), groups=4, bias=False),  # multiplier 2
    _case(2, 3, 3, 13, 12, k=3, s=2, p=1, groups=3),                       # depthwise, stride 2
    _case(2, 5, 5, 10, 11, k=(3, 2), s=(1, 3), p=(2, 1), d=(1, 2), groups=5),
    _case(3, 2, 6, 9, 13, k=(4, 4), s=(2, 2), p=(1, 2), groups=2),         # multiplier 3, 16 taps
    _case(1, 3, 3, 8, 8, k=1, s=2, groups=3),                              # 1x1 depthwise
    _case(2, 2, 2, 6, 7, k=5, p=2, groups=2, bias=False),                  # kernel ~ input
    _case(1, 2, 4, 1, 9, k=(1, 3), s=(1, 2), groups=2),                    # H == 1
    _case(2, 4, 4, 5, 5, k=3, p=3, groups=4),                              # padding > kernel
    _case(1, 3, 6, 7, 40, k=(7, 7), s=(1, 2), p=3, groups=3),              # 49 taps, long rows
    _case(2, 8, 8, 21, 19, k=3, s=1, p=1, d=2, groups=8),                  # dilated depthwise
    _case(1, 2, 2, 5, 30, k=(2, 3), p=(0, 4), d=(1, 9), groups=2),         # taps 18 columns apart
]


def _id(c):
    return ("n{N}c{C}o{O}g{groups}_{H}x{W}_k{k[0]}{k[1]}_s{s[0]}{s[1]}_p{p[0]}{p[1]}"
            "_d{d[0]}{d[1]}{b}").format(b="" if c["bias"] else "_nb", **c)


def _is_depthwise(c):
    return c["groups"] == c["C"]


def make_layer(c, dtype, seed=0, fuse_relu=False):
    return nn.Conv2d(c["C"], c["O"], c["k"], stride=c["s"], padding=c["p"], dilation=c["d"],
                     groups=c["groups"], bias=c["bias"], dtype=dtype, seed=seed,
                     fuse_relu=fuse_relu)


def _input(c, rng, dtype=np.float64):
    return rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(dtype)


def _reference(c, layer, x, dy):
    w = layer.weight.data
    b = layer.bias.data if c["bias"] else None
    y = R.conv2d_forward(x, w, b, c["s"], c["p"], c["d"], groups=c["groups"])
    return (y,) + R.conv2d_backward(x, w, dy, c["s"], c["p"], c["d"], c["bias"], c["groups"])


@pytest.fixture(params=["depthwise", "im2col"])
def path(request, monkeypatch):
    """Depthwise layers through their own kernels, or through im2col + GEMM."""
    monkeypatch.setattr(conv_module, "DEPTHWISE_KERNEL", request.param == "depthwise")
    return request.param


def with_paths(cases):
    """(case, path) for the tests that take both: depthwise layers through both paths,
    the other grouped layers through im2col, their only one."""
    return [pytest.param(c, path, id=f"{_id(c)}-{path}") for c in cases
            for path in (("depthwise", "im2col") if _is_depthwise(c) else ("im2col",))]


def _run(layer, x, dy, input_grad=True):
    """(y, dx, weight grad, bias grad or None) from a fresh forward and backward."""
    layer.zero_grad()
    y = layer(x).copy()
    dx = layer.backward(dy, input_grad=input_grad)
    return (y, None if dx is None else dx.copy(), layer.weight.grad.copy(),
            None if layer.bias is None else layer.bias.grad.copy())


@pytest.mark.parametrize("c", CASES[:4], ids=_id)
def test_grouped_reference_is_a_block_diagonal_dense_conv(c, rng):
    """The reference's groups against a dense weight that is zero outside the groups."""
    cg, og = c["C"] // c["groups"], c["O"] // c["groups"]
    w = rng.standard_normal((c["O"], cg) + c["k"])
    dense = np.zeros((c["O"], c["C"]) + c["k"])
    for o in range(c["O"]):
        dense[o, o // og * cg:(o // og + 1) * cg] = w[o]
    x = _input(c, rng)
    b = rng.standard_normal(c["O"])
    y = R.conv2d_forward(x, dense, b, c["s"], c["p"], c["d"])
    np.testing.assert_allclose(R.conv2d_forward(x, w, b, c["s"], c["p"], c["d"], c["groups"]), y)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = R.conv2d_backward(x, dense, dy, c["s"], c["p"], c["d"])
    gdx, gdw, gdb = R.conv2d_backward(x, w, dy, c["s"], c["p"], c["d"], True, c["groups"])
    np.testing.assert_allclose(gdx, dx)
    np.testing.assert_allclose(gdb, db)
    for o in range(c["O"]):
        np.testing.assert_allclose(gdw[o], dw[o, o // og * cg:(o // og + 1) * cg])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,path", with_paths(CASES), indirect=["path"])
def test_matches_reference(c, dtype, rng, path):
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((c["N"], c["O"]) + layer.output_shape(x.shape)[2:]).astype(dtype)
    y, dx, dw, db = _run(layer, x, dy)
    ry, rdx, rdw, rdb = _reference(c, layer, x, dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, ry, dtype, err_msg="y")
    assert_close(dx, rdx, dtype, err_msg="dx")
    assert_close(dw, rdw, dtype, err_msg="dW")
    if c["bias"]:
        assert_close(db, rdb, dtype, err_msg="db")
    _, no_dx, dw2, _ = _run(layer, x, dy, input_grad=False)
    assert no_dx is None
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("c,path", with_paths([c for c in CASES
                                                if c["N"] * c["C"] * c["H"] * c["W"] <= 1000]),
                         indirect=["path"])
def test_gradients_match_finite_differences(c, rng, path):
    layer = make_layer(c, np.float64)
    x = _input(c, rng)
    proj = rng.standard_normal((c["N"], c["O"]) + layer.output_shape(x.shape)[2:])
    _, dx, dw, db = _run(layer, x, proj)

    def loss(_):
        with cyconv.no_grad():
            return float((layer(x) * proj).sum())
    np.testing.assert_allclose(dx, finite_difference(loss, x), **FD_TOL)
    np.testing.assert_allclose(dw, finite_difference(loss, layer.weight.data), **FD_TOL)
    if c["bias"]:
        np.testing.assert_allclose(db, finite_difference(loss, layer.bias.data), **FD_TOL)


@pytest.mark.parametrize("c,path", with_paths(CASES), indirect=["path"])
def test_matches_torch(c, rng, path):
    torch = pytest.importorskip("torch")
    layer = make_layer(c, np.float64)
    tconv = torch.nn.Conv2d(c["C"], c["O"], c["k"], c["s"], c["p"], c["d"], c["groups"],
                            c["bias"]).double()
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(layer.weight.data))
        if c["bias"]:
            tconv.bias.copy_(torch.from_numpy(layer.bias.data))
    x = _input(c, rng)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tconv(tx)
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(dy))
    y, dx, dw, db = _run(layer, x, dy)
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(dw, tconv.weight.grad.numpy(), **tol)
    if c["bias"]:
        np.testing.assert_allclose(db, tconv.bias.grad.numpy(), **tol)


@pytest.mark.parametrize("c", CASES[3:6], ids=_id)
def test_fused_relu_equals_conv_then_relu(c, rng, path):
    fused = make_layer(c, np.float64, fuse_relu=True)
    plain, relu = make_layer(c, np.float64), nn.ReLU()
    x = _input(c, rng)
    y = fused(x)
    np.testing.assert_allclose(y, relu(plain(x)), rtol=1e-12, atol=1e-14)
    assert (y == 0).mean() > 0.2
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(relu.backward(dy)),
                               rtol=1e-12, atol=1e-14)
    for pf, pp in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(pf.grad, pp.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [CASES[0], CASES[3], CASES[5], CASES[10],
                               _case(5, 16, 32, 30, 33, k=3, s=2, p=1, groups=16)], ids=_id)
def test_bitwise_the_same_for_1_2_3_threads(c, dtype, rng, path, threads):
    layer = make_layer(c, dtype, fuse_relu=True)
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((c["N"], c["O"]) + layer.output_shape(x.shape)[2:]).astype(dtype)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(_run(layer, x, dy))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [c for c in CASES if _is_depthwise(c)] + [
    _case(2, 16, 32, 30, 33, k=3, s=2, p=1, groups=16)], ids=_id)
def test_depthwise_kernels_same_bits_for_both_vector_widths(c, dtype, rng):
    """The depthwise kernels' 64-byte (AVX-512) and 32-byte (AVX2) vectors compute each
    element alike: whichever the CPU picks, the results are the same."""
    layer = make_layer(c, dtype, fuse_relu=True)
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((c["N"], c["O"]) + layer.output_shape(x.shape)[2:]).astype(dtype)
    results = []
    try:
        for width in (32, 64):
            _depthwise.force_vector_width(width)
            results.append(_run(layer, x, dy))
    finally:
        _depthwise.force_vector_width(None)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paths_agree_on_a_mobilenet_layer(dtype, rng):
    """A MobileNetV2 depthwise layer (3x3, stride 2, rows of more than one vector)."""
    layer = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False, dtype=dtype, seed=0)
    x = rng.standard_normal((3, 32, 38, 37)).astype(dtype)
    dy = rng.standard_normal((3, 32, 19, 19)).astype(dtype)
    direct = _run(layer, x, dy)
    conv_module.DEPTHWISE_KERNEL = False
    try:
        via_gemm = _run(layer, x, dy)
    finally:
        conv_module.DEPTHWISE_KERNEL = True
    for a, b in zip(direct[:3], via_gemm[:3]):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("width, kernel, stride, dilation, unread", [
    (8, 3, 2, 1, [7]),                # past the last window
    (6, 2, 2, 3, [1, 4]),             # between dilated taps: windows read 0, 3 and 2, 5
])
def test_columns_no_window_reads_do_not_reach_the_gradients(width, kernel, stride, dilation,
                                                            unread, rng, path):
    """Input columns that no window reads: an inf there must not turn the weight gradient
    into NaN (inf * 0)."""
    c = _case(2, 4, 8, 6, width, k=(3, kernel), s=(1, stride), d=(1, dilation), groups=4)
    layer = make_layer(c, np.float64)
    x = _input(c, rng)
    dy = rng.standard_normal((2, 8) + layer.output_shape(x.shape)[2:])
    expected = _run(layer, x, dy)
    x[..., unread] = np.inf
    for a, b in zip(expected, _run(layer, x, dy)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("channels, groups", [((4, 6), 4), ((6, 4), 4), ((5, 10), 2),
                                              ((3, 3), 2)])
def test_groups_that_do_not_divide_the_channels_are_refused(channels, groups):
    with pytest.raises(ValueError) as excinfo:
        nn.Conv2d(*channels, 3, groups=groups)
    assert_msg_mentions(excinfo, "Conv2d", "groups", f"groups={groups}", str(channels[0]),
                        str(channels[1]))


@pytest.mark.parametrize("groups", [0, -2, 1.5, True, "2"])
def test_groups_must_be_a_positive_int(groups):
    with pytest.raises(ValueError) as excinfo:
        nn.Conv2d(4, 4, 3, groups=groups)
    assert_msg_mentions(excinfo, "groups", "positive int")


@pytest.mark.parametrize("path_", ["depthwise", "im2col"])
def test_wrong_input_channels_are_refused_before_any_kernel(path_, monkeypatch):
    monkeypatch.setattr(conv_module, "DEPTHWISE_KERNEL", path_ == "depthwise")
    layer = nn.Conv2d(4, 8, 3, groups=4)
    with pytest.raises(ValueError) as excinfo:
        layer(np.zeros((2, 8, 5, 5), np.float32))
    assert_msg_mentions(excinfo, "Conv2d", (2, 8, 5, 5), "4")
