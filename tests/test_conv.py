"""Conv2d: forward and backward against the numpy reference, finite
differences, PyTorch, and assorted properties."""
import numpy as np
import pytest

import cyconv
from cyconv import _conv_direct, nn
from cyconv.nn import conv as conv_module

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, finite_difference, random_projection_loss


def _case(N, C, O, H, W, k, s=1, p=0, d=1, bias=True):
    return dict(N=N, C=C, O=O, H=H, W=W, k=R.pair(k), s=R.pair(s), p=R.pair(p),
                d=R.pair(d), bias=bias)


def _out_hw(c):
    return (R.conv_out_size(c["H"], c["k"][0], c["s"][0], c["p"][0], c["d"][0]),
            R.conv_out_size(c["W"], c["k"][1], c["s"][1], c["p"][1], c["d"][1]))


def _random_cases(n=26, seed=20240611):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        c = _case(N=int(rng.integers(1, 4)), C=int(rng.integers(1, 5)),
                  O=int(rng.integers(1, 5)), H=int(rng.integers(1, 13)),
                  W=int(rng.integers(1, 13)),
                  k=tuple(int(v) for v in rng.integers(1, 6, 2)),
                  s=tuple(int(v) for v in rng.integers(1, 4, 2)),
                  p=tuple(int(v) for v in rng.integers(0, 3, 2)),
                  d=tuple(int(v) for v in rng.integers(1, 3, 2)),
                  bias=bool(rng.integers(0, 2)))
        if min(_out_hw(c)) >= 1:
            cases.append(c)
    return cases


EDGE_CASES = [
    _case(2, 3, 4, 5, 7, k=1),                               # 1x1, stride 1
    _case(2, 3, 2, 6, 5, k=1, s=2),                          # 1x1, stride 2 (skips inputs)
    _case(2, 5, 3, 7, 8, k=1, s=(3, 2)),                     # 1x1, per-axis strides
    _case(1, 3, 2, 5, 9, k=1, s=(1, 3), d=2, bias=False),    # 1x1, stride across only
    _case(1, 2, 3, 3, 4, k=1, p=2),                          # padding > kernel
    _case(2, 2, 3, 5, 5, k=5),                               # kernel == input -> 1x1
    _case(2, 2, 2, 7, 9, k=(2, 4), s=(2, 3), p=(1, 0)),      # even, non-square
    _case(1, 3, 2, 9, 8, k=3, s=(1, 2), p=(0, 2), d=(2, 1)),  # per-axis everything
    _case(2, 2, 2, 1, 12, k=(1, 3), s=(1, 2)),               # H == 1
    _case(3, 2, 3, 10, 11, k=3, s=3, bias=False),            # (H - k) % s != 0
    _case(1, 1, 1, 4, 4, k=2, s=3),                          # stride > kernel
    _case(1, 1, 1, 1, 1, k=1),                               # scalar image
    _case(2, 4, 4, 12, 12, k=3, s=2, p=1),                   # typical downsampling
    _case(1, 2, 2, 8, 8, k=3, p=2, d=2),                     # "same" dilated conv
    _case(2, 3, 1, 6, 7, k=(5, 2), s=(3, 1), p=(2, 1), d=(1, 2), bias=False),
]

CASES = _random_cases() + EDGE_CASES


def _id(c):
    return ("n{N}c{C}o{O}_{H}x{W}_k{k[0]}{k[1]}_s{s[0]}{s[1]}_p{p[0]}{p[1]}"
            "_d{d[0]}{d[1]}_{b}").format(b="b" if c["bias"] else "nb", **c)


def _fd_cases():
    small = [c for c in CASES
             if c["N"] * c["C"] * c["H"] * c["W"] <= 80
             and c["O"] * c["C"] * c["k"][0] * c["k"][1] <= 80]
    return small[:10]


def make_layer(c, dtype, seed=0):
    return nn.Conv2d(c["C"], c["O"], c["k"], stride=c["s"], padding=c["p"],
                     dilation=c["d"], bias=c["bias"], dtype=dtype, seed=seed)


def ref_forward(c, layer, x):
    params = layer.parameters()
    b = params[1].data if c["bias"] else None
    return R.conv2d_forward(x, params[0].data, b, c["s"], c["p"], c["d"])


def ref_backward(c, layer, x, dy):
    return R.conv2d_backward(x, layer.parameters()[0].data, dy, c["s"], c["p"],
                             c["d"], bias=c["bias"])


def force_forward_kernel(monkeypatch, direct):
    """The direct kernel for every layer with K = C*kh*kw <= _conv_direct.MAX_DIRECT_TAPS,
    whatever its width (direct), or im2col + GEMM for all."""
    limit = _conv_direct.MAX_DIRECT_TAPS if direct else 0
    monkeypatch.setattr(conv_module, "DIRECT_MAX_TAPS", limit)
    monkeypatch.setattr(conv_module, "DIRECT_WIDE_MAX_TAPS", limit)


@pytest.fixture(params=["direct", "im2col"])
def forward_path(request, monkeypatch):
    """Runs a test with each forward kernel (force_forward_kernel)."""
    force_forward_kernel(monkeypatch, request.param == "direct")
    return request.param


def _input(c, rng, dtype):
    return rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_forward_matches_reference(c, dtype, rng, forward_path):
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    x0 = x.copy()
    y = layer(x)
    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype
    assert y.shape == (c["N"], c["O"]) + _out_hw(c)
    assert_close(y, ref_forward(c, layer, x), dtype)
    np.testing.assert_array_equal(x, x0)  # input untouched
    np.testing.assert_array_equal(layer.forward(x), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_backward_matches_reference(c, dtype, rng):
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    y = layer(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dy0 = dy.copy()
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dy, dy0)  # upstream grad untouched
    rdx, rdw, rdb = ref_backward(c, layer, x, dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, rdx, dtype, err_msg="dx")
    params = layer.parameters()
    assert len(params) == (2 if c["bias"] else 1)
    assert params[0].grad.dtype == dtype
    assert_close(params[0].grad, rdw, dtype, err_msg="dW")
    if c["bias"]:
        assert params[1].grad.dtype == dtype
        assert_close(params[1].grad, rdb, dtype, err_msg="db")


@pytest.mark.parametrize("c", _fd_cases(), ids=_id)
def test_backward_matches_finite_differences(c, rng):
    layer = make_layer(c, np.float64)
    x = _input(c, rng, np.float64)
    Rm = rng.standard_normal((c["N"], c["O"]) + _out_hw(c))
    f = random_projection_loss(layer, x, Rm)
    layer.zero_grad()
    layer(x)
    dx = layer.backward(Rm.copy())
    grads = [p.grad.copy() for p in layer.parameters()]
    np.testing.assert_allclose(dx, finite_difference(lambda v: float((layer(v) * Rm).sum()), x),
                               **FD_TOL)
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_allclose(g, finite_difference(f, p.data), **FD_TOL)


@pytest.mark.parametrize("c", _fd_cases()[:4], ids=_id)
def test_reference_backward_matches_finite_differences(c, rng):
    """Sanity check of the reference itself."""
    x = _input(c, rng, np.float64)
    w = rng.standard_normal((c["O"], c["C"]) + c["k"])
    b = rng.standard_normal(c["O"])
    Rm = rng.standard_normal((c["N"], c["O"]) + _out_hw(c))
    fwd = lambda x_, w_, b_: (R.conv2d_forward(x_, w_, b_, c["s"], c["p"], c["d"]) * Rm).sum()
    dx, dw, db = R.conv2d_backward(x, w, Rm, c["s"], c["p"], c["d"])
    np.testing.assert_allclose(dx, finite_difference(lambda v: fwd(v, w, b), x), **FD_TOL)
    np.testing.assert_allclose(dw, finite_difference(lambda v: fwd(x, v, b), w), **FD_TOL)
    np.testing.assert_allclose(db, finite_difference(lambda v: fwd(x, w, v), b), **FD_TOL)


@pytest.mark.parametrize("c", CASES[::3], ids=_id)
def test_matches_torch(c, rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    layer = make_layer(c, np.float64)
    x = _input(c, rng, np.float64)
    tconv = torch.nn.Conv2d(c["C"], c["O"], c["k"], c["s"], c["p"], c["d"],
                            bias=c["bias"]).double()
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(layer.parameters()[0].data))
        if c["bias"]:
            tconv.bias.copy_(torch.from_numpy(layer.parameters()[1].data))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tconv(tx)
    y = layer(x)
    assert y.shape == tuple(ty.shape)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.parameters()[0].grad, tconv.weight.grad.numpy(),
                               rtol=1e-10, atol=1e-10)
    if c["bias"]:
        np.testing.assert_allclose(layer.parameters()[1].grad, tconv.bias.grad.numpy(),
                                   rtol=1e-10, atol=1e-10)


def test_int_and_tuple_arguments_are_equivalent(rng):
    a = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, dtype=np.float64, seed=3)
    b = nn.Conv2d(2, 3, (3, 3), stride=(2, 2), padding=(1, 1), dilation=(2, 2),
                  dtype=np.float64, seed=3)
    x = rng.standard_normal((2, 2, 9, 8))
    np.testing.assert_array_equal(a(x), b(x))


def test_param_grads_accumulate(rng):
    c = _case(2, 3, 2, 6, 5, k=3, s=2, p=1)
    layer = make_layer(c, np.float64)
    x = _input(c, rng, np.float64)
    dy = rng.standard_normal((2, 2) + _out_hw(c))
    layer.zero_grad()
    layer(x)
    dx1 = layer.backward(dy)
    g1 = [p.grad.copy() for p in layer.parameters()]
    layer(x)
    dx2 = layer.backward(dy)
    np.testing.assert_array_equal(dx1, dx2)  # the input gradient does not accumulate
    for p, g in zip(layer.parameters(), g1):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-12, atol=1e-12)
    layer.zero_grad()
    for p in layer.parameters():
        assert not np.any(p.grad)


def test_backward_after_two_forwards_or_twice_raises_and_changes_nothing(rng):
    """One forward, one backward: cyconv keeps the state of one forward, so a backward
    after two forwards (which one?) and a second backward both raise before any
    gradient changes; the next forward/backward pair works."""
    c = _case(1, 2, 2, 5, 5, k=3, p=1)
    layer = make_layer(c, np.float64)
    x1, x2 = _input(c, rng, np.float64), _input(c, rng, np.float64)
    dy = rng.standard_normal((1, 2, 5, 5))
    layer.zero_grad()
    layer(x1)
    layer(x2)
    with pytest.raises(RuntimeError, match="forward ran 2 times"):
        layer.backward(dy)
    assert not any(np.any(p.grad) for p in layer.parameters())
    layer(x2)
    layer.backward(dy)
    grads = [p.grad.copy() for p in layer.parameters()]
    _, rdw, _ = ref_backward(c, layer, x2, dy)
    np.testing.assert_allclose(grads[0], rdw, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="called twice for one forward"):
        layer.backward(dy)
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)
    with cyconv.no_grad():
        layer(x1)   # a forward under no_grad does not count, but keeps nothing
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(dy)


def test_different_batch_sizes_reuse_layer(rng):
    layer = nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64, seed=1)
    for n, h, w in [(1, 4, 4), (3, 7, 5), (2, 4, 4)]:
        x = rng.standard_normal((n, 2, h, w))
        p = layer.parameters()
        np.testing.assert_allclose(layer(x), R.conv2d_forward(x, p[0].data, p[1].data, 1, 1),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_adds_nothing_to_the_gradients(dtype, transposed, rng, monkeypatch):
    """A batch of 0 images adds 0 to the parameters' gradients, whatever the scratch
    arrays hold from an earlier step (the transposed weight gradient's parts are scratch
    that only images write)."""
    monkeypatch.setattr(conv_module, "TRANSPOSED_WEIGHT_GRAD", transposed)
    layer = nn.Conv2d(5, 2, 3, stride=2, padding=1, dtype=dtype, seed=0)
    x = rng.standard_normal((3, 5, 9, 8)).astype(dtype)
    layer(x)
    layer.backward(rng.standard_normal(layer.output_shape(x.shape)).astype(dtype))
    layer.zero_grad()
    empty_x = np.zeros((0, 5, 9, 8), dtype)
    layer(empty_x)
    dx = layer.backward(np.zeros(layer.output_shape(empty_x.shape), dtype))
    assert dx.shape == empty_x.shape
    for p in layer.parameters():
        np.testing.assert_array_equal(p.grad, 0)


def test_weight_changes_are_seen_by_forward(rng):
    layer = nn.Conv2d(2, 3, 3, dtype=np.float64, seed=1)
    x = rng.standard_normal((1, 2, 5, 5))
    layer(x)
    w, b = layer.parameters()
    w.data[...] = rng.standard_normal(w.data.shape)
    b.data[...] = rng.standard_normal(b.data.shape)
    np.testing.assert_allclose(layer(x), R.conv2d_forward(x, w.data, b.data),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_and_state_dict(dtype):
    layer = nn.Conv2d(3, 5, (2, 4), dtype=dtype, seed=0)
    w, b = layer.parameters()
    assert w.data.shape == (5, 3, 2, 4) and b.data.shape == (5,)
    assert w.data.dtype == dtype and b.data.dtype == dtype
    assert w.grad.shape == w.data.shape and w.grad.dtype == dtype
    sd = layer.state_dict()
    assert list(sd.keys()) == ["weight", "bias"]
    np.testing.assert_array_equal(sd["weight"], w.data)
    nb = nn.Conv2d(3, 5, 3, bias=False, dtype=dtype, seed=0)
    assert len(nb.parameters()) == 1
    assert list(nb.state_dict().keys()) == ["weight"]


@pytest.mark.parametrize("fan", [(3, 8, 3), (16, 4, 5), (1, 64, 1)])
def test_kaiming_uniform_init(fan):
    cin, cout, k = fan
    layer = nn.Conv2d(cin, cout, k, seed=0)
    w, b = (p.data for p in layer.parameters())
    bound = 1.0 / np.sqrt(cin * k * k)
    assert np.all(np.abs(w) <= bound * (1 + 1e-6))
    assert np.all(np.abs(b) <= bound * (1 + 1e-6))
    if w.size >= 200:
        # uniform on [-bound, bound]: std = bound / sqrt(3), fills the range
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound
        assert np.abs(w).max() > 0.9 * bound
        assert abs(w.mean()) < 0.1 * bound
    assert len(np.unique(w)) == w.size  # no repeated values


def test_seed_reproducible():
    a = nn.Conv2d(3, 4, 3, seed=7)
    b = nn.Conv2d(3, 4, 3, seed=7)
    c = nn.Conv2d(3, 4, 3, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert not np.array_equal(a.parameters()[0].data, c.parameters()[0].data)


def test_manual_seed_reproducible():
    cyconv.manual_seed(0)
    a = nn.Conv2d(3, 4, 3)
    a2 = nn.Conv2d(3, 4, 3)
    cyconv.manual_seed(0)
    b = nn.Conv2d(3, 4, 3)
    np.testing.assert_array_equal(a.parameters()[0].data, b.parameters()[0].data)
    np.testing.assert_array_equal(a.parameters()[1].data, b.parameters()[1].data)
    assert not np.array_equal(a.parameters()[0].data, a2.parameters()[0].data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_and_im2col_forward_agree_on_a_first_layer(dtype, rng, monkeypatch):
    """The reference network's first layer (K = 27, stride 2, 224x224 input), both kernels."""
    layer = nn.Conv2d(3, 16, 3, stride=2, dtype=dtype, seed=0, fuse_relu=True)
    x = rng.standard_normal((3, 3, 224, 224)).astype(dtype)
    direct = layer(x).copy()
    force_forward_kernel(monkeypatch, direct=False)
    assert_close(layer(x), direct, dtype)
    assert (direct == 0).mean() > 0.3  # the fused ReLU did cut


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16, 224, 224, 2, 1), (2, 11, 9, 13, 1, 0),
                                   (1, 2, 31, 5, 3, 2), (16, 13, 5, 140, 2, 1)])
def test_direct_kernel_same_bits_for_both_vector_widths(dtype, shape, rng):
    """The direct kernel's 64-byte (AVX-512) and 32-byte (AVX2) register blocks give the
    same bits: 16 channels and more than a vector of columns, odd channels and widths,
    stride 3, with and without the fused ReLU; 144 taps over 70 columns (whole blocks of 3
    vectors, the last one again over columns already done, single vectors, and blocks of
    4 or 8 channels and single ones)."""
    c, oc, h, w, s, p = shape
    x = rng.standard_normal((2, c, h, w)).astype(dtype)
    for fuse_relu in (False, True):
        layer = nn.Conv2d(c, oc, 3, stride=s, padding=p, dtype=dtype, seed=0, fuse_relu=fuse_relu)
        outputs = []
        try:
            for width in (32, 64):
                _conv_direct.force_vector_width(width)
                outputs.append(layer(x).copy())
        finally:
            _conv_direct.force_vector_width(None)
        np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vector_bytes", [32, 64])
def test_direct_kernel_every_row_width_matches_reference(dtype, vector_bytes, rng):
    """Output rows of 1 to 100 columns, in 32- and 64-byte vectors: every split of a row
    into whole blocks of 3 vectors, the row's last 3 vectors again (some columns twice),
    blocks of 2 vectors and single (partial) vectors; the reference's outputs."""
    layer = nn.Conv2d(3, 9, 3, padding=1, dtype=dtype, seed=0)
    weight, bias = layer.weight.data, layer.bias.data
    try:
        _conv_direct.force_vector_width(vector_bytes)
        for width in range(1, 101):
            x = rng.standard_normal((1, 3, 2, width)).astype(dtype)
            assert layer._uses_direct_kernel(layer._geometry(x.shape))
            with cyconv.no_grad():
                y = layer(x)
            assert_close(y, R.conv2d_forward(x, weight, bias, 1, 1), dtype)
    finally:
        _conv_direct.force_vector_width(None)


def _takes_direct_weight_grad(c):
    """The layers whose weight gradient, without an input gradient, the direct kernel
    computes (Conv2d._uses_direct_weight_grad): few taps, not pointwise, stride_w <= 4."""
    taps = c["C"] * c["k"][0] * c["k"][1]
    pointwise = c["k"] == (1, 1) and (c["s"] == (1, 1) or c["p"] == (0, 0))
    return taps <= conv_module.DIRECT_MAX_TAPS and not pointwise and c["s"][1] <= 4


FIRST_LAYER_CASES = [c for c in CASES if _takes_direct_weight_grad(c)] + [
    _case(3, 3, 16, 23, 37, k=3, s=2),                # RGB 3x3 stride 2: 4 x 2 blocks, tails
    _case(2, 3, 5, 9, 21, k=3, s=2, p=1, bias=False),
    _case(2, 1, 6, 11, 40, k=5, s=3, p=2),
    _case(1, 2, 9, 7, 19, k=(3, 4), s=(3, 2), p=(1, 2), d=(2, 1)),
    _case(17, 3, 4, 8, 9, k=3),                       # more images than work items
]


def first_layer_grads(layer, x, dy):
    """The parameters' gradients of a backward without the input gradient."""
    layer.zero_grad()
    layer(x)
    assert layer.backward(dy, input_grad=False) is None
    return [p.grad.copy() for p in layer.parameters()]


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", FIRST_LAYER_CASES, ids=_id)
def test_first_layer_weight_gradient_matches_reference_for_any_thread_count(c, dtype, fuse_relu,
                                                                            rng, threads):
    """A layer of few taps without input gradient (a network's first) takes its weight
    gradient from the direct kernel: the reference's, the same bits for 1, 2 and 3
    threads, and close to im2col + GEMM's."""
    layer = nn.Conv2d(c["C"], c["O"], c["k"], stride=c["s"], padding=c["p"], dilation=c["d"],
                      bias=c["bias"], dtype=dtype, seed=0, fuse_relu=fuse_relu)
    x = _input(c, rng, dtype)
    assert layer._uses_direct_weight_grad(layer._geometry(x.shape))
    with cyconv.no_grad():
        y = layer(x).copy()
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = []
    for n in (1, 2, 3):
        threads(n)
        grads.append(first_layer_grads(layer, x, dy))
    _, rdw, rdb = R.conv2d_backward(x, layer.weight.data, dy * (y > 0) if fuse_relu else dy,
                                    c["s"], c["p"], c["d"], bias=c["bias"])
    assert_close(grads[0][0], rdw, dtype, err_msg="dW")
    if c["bias"]:
        assert_close(grads[0][1], rdb, dtype, err_msg="db")
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_array_equal(a, b)
    layer.zero_grad()
    layer(x)
    layer.backward(dy)   # with the input gradient: im2col + GEMM
    for a, b in zip(grads[0], [p.grad for p in layer.parameters()]):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("c", FIRST_LAYER_CASES[-5:-1], ids=_id)
def test_first_layer_weight_gradient_matches_finite_differences(c, rng):
    layer = nn.Conv2d(c["C"], c["O"], c["k"], stride=c["s"], padding=c["p"], dilation=c["d"],
                      bias=c["bias"], dtype=np.float64, seed=0)
    x = _input(c, rng, np.float64)[:1, :, :9, :11]
    Rm = rng.standard_normal(layer.output_shape(x.shape))
    grads = first_layer_grads(layer, x, Rm)
    f = random_projection_loss(layer, x, Rm)
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_allclose(g, finite_difference(f, p.data), **FD_TOL)


def test_first_layer_weight_gradient_matches_torch(rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    layer = nn.Conv2d(3, 16, 3, stride=2, padding=1, dtype=np.float64, seed=0, fuse_relu=True)
    x = rng.standard_normal((4, 3, 33, 30))
    tconv = torch.nn.Conv2d(3, 16, 3, 2, 1).double()
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(layer.weight.data))
        tconv.bias.copy_(torch.from_numpy(layer.bias.data))
    ty = torch.relu(tconv(torch.from_numpy(x)))
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(dy))
    dw, db = first_layer_grads(layer, x, dy)
    np.testing.assert_allclose(dw, tconv.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, tconv.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_first_layer_weight_gradient_ignores_pixels_no_output_reads(rng):
    """The kernel's runs go on past the last output column into pixels that no output
    reads (here column 13 of 14: 3x3, stride 2): an inf there must not reach the sums."""
    layer = nn.Conv2d(3, 5, 3, stride=2, seed=0)
    x = rng.standard_normal((2, 3, 9, 14)).astype(np.float32)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
    clean = first_layer_grads(layer, x, dy)
    x[:, :, :, 13] = np.inf
    for a, b in zip(first_layer_grads(layer, x, dy), clean):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [_case(3, 8, 11, 9, 70, k=5, s=2, p=2),    # 200 taps, 35 columns
                               _case(2, 11, 6, 7, 29, k=3, p=2, d=2)],  # 99 taps, 29 columns
                         ids=["5x5 stride 2", "3x3 dilation 2"])
def test_direct_kernel_on_wide_rows_matches_reference_for_any_thread_count(c, dtype, rng,
                                                                            threads):
    """Layers of more than DIRECT_MAX_TAPS taps whose output rows are DIRECT_MIN_COLUMNS
    wide or more take the direct kernel by default: the reference's outputs, and the same
    bits for 1, 2 and 3 threads."""
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    taps = layer.weight.data[0].size
    assert conv_module.DIRECT_MAX_TAPS < taps <= conv_module.DIRECT_WIDE_MAX_TAPS
    assert layer._uses_direct_kernel(layer._geometry(x.shape))
    outputs = []
    with cyconv.no_grad():
        for n in (1, 2, 3):
            threads(n)
            outputs.append(layer(x).copy())
    assert_close(outputs[0], ref_forward(c, layer, x), dtype)
    for y in outputs[1:]:
        np.testing.assert_array_equal(y, outputs[0])


MEDIUM_CASES = [
    _case(2, 16, 24, 12, 12, k=3, p=1),
    _case(3, 8, 5, 10, 11, k=5, s=2, p=2),
    _case(1, 32, 8, 7, 9, k=(1, 3), s=(2, 1), p=(0, 1), d=(1, 2), bias=False),
    _case(2, 3, 6, 13, 17, k=3, s=2, p=1),  # a first layer: few taps (direct kernel)
    _case(1, 2, 5, 11, 9, k=(3, 4), s=(3, 2), p=(1, 2), d=(2, 1)),  # odd everything, few taps
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", MEDIUM_CASES, ids=_id)
def test_medium_sizes_match_reference(c, dtype, rng, forward_path):
    """Larger channel counts (longer GEMM reductions) than the random cases."""
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    y = layer(x)
    assert_close(y, ref_forward(c, layer, x), dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    rdx, rdw, rdb = ref_backward(c, layer, x, dy)
    assert_close(dx, rdx, dtype)
    assert_close(layer.parameters()[0].grad, rdw, dtype)
    if c["bias"]:
        assert_close(layer.parameters()[1].grad, rdb, dtype)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_forward_equals_grad_forward(dtype, n_threads, threads, rng, forward_path):
    threads(n_threads)
    c = _case(5, 3, 4, 9, 8, k=3, s=2, p=1)
    layer = make_layer(c, dtype)
    x = _input(c, rng, dtype)
    y = layer(x).copy()
    layer.discard_saved()   # that forward is not backpropagated
    with cyconv.no_grad():
        y_ng = layer(x)
    np.testing.assert_array_equal(y, y_ng)
    # and a grad-mode forward afterwards still gives correct gradients
    layer(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    layer.zero_grad()
    dx = layer.backward(dy)
    rdx, rdw, _ = ref_backward(c, layer, x, dy)
    assert_close(dx, rdx, dtype)
    assert_close(layer.parameters()[0].grad, rdw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [_case(2, 3, 2, 7, 6, k=3, s=(2, 1), p=1),    # 27 taps
                               _case(2, 5, 2, 7, 6, k=3, s=(2, 1), p=1)],   # 45 taps
                         ids=["few taps", "more taps"])
def test_input_grad_false_still_accumulates_param_grads(c, dtype, rng):
    """The same parameter gradients without the input gradient: the same bits, or for a
    layer of few taps (the direct kernel's weight gradient) the same to rounding."""
    a, b = make_layer(c, dtype), make_layer(c, dtype)
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((2, 2) + _out_hw(c)).astype(dtype)
    a(x)
    a.backward(dy)
    b(x)
    assert b.backward(dy, input_grad=False) is None
    direct = b._uses_direct_weight_grad(b._geometry(x.shape))
    assert direct == (c["C"] == 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        if direct:
            assert_close(pa.grad, pb.grad, dtype)
        else:
            np.testing.assert_array_equal(pa.grad, pb.grad)


@pytest.mark.parametrize("c", [EDGE_CASES[4], EDGE_CASES[10], CASES[0]], ids=_id)
def test_fused_relu_option(c, rng, forward_path):
    """Conv2d(..., fuse_relu=True) (an extension beyond the PyTorch API) must
    equal Conv2d followed by ReLU, forward and backward."""
    fused = nn.Conv2d(c["C"], c["O"], c["k"], stride=c["s"], padding=c["p"], dilation=c["d"],
                      bias=c["bias"], dtype=np.float64, seed=0, fuse_relu=True)
    plain = make_layer(c, np.float64)
    relu = nn.ReLU()
    x = _input(c, rng, np.float64)
    y = fused(x)
    np.testing.assert_allclose(y, relu(plain(x)), rtol=1e-12, atol=1e-14)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(relu.backward(dy)),
                               rtol=1e-12, atol=1e-14)
    for pf, pp in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(pf.grad, pp.grad, rtol=1e-12, atol=1e-14)


# How the weight gradient is split into work items (chunks of images x blocks of K,
# see conv_module.weight_grad_split), forced into each regime by its constants.
SPLITS = {
    "default": lambda weight_bytes: {},
    "one chunk, blocks of K": lambda weight_bytes: dict(PARTS_BYTES=1, MIN_BLOCK_COLUMNS=4),
    "3 chunks x blocks": lambda weight_bytes: dict(PARTS_BYTES=3 * weight_bytes,
                                                   WEIGHT_GRAD_ITEMS=64, MIN_BLOCK_COLUMNS=5),
}


def _same_for_any_thread_count_and_like_reference(layer, c, x, dy, dtype, threads):
    """Forward and backward of a fused-ReLU layer on 1, 2 and 3 threads: the same bits,
    and the reference's gradients."""
    results = []
    for n in (1, 2, 3):
        threads(n)
        layer.zero_grad()
        y = layer(x).copy()
        results.append([y, layer.backward(dy).copy()] + [p.grad.copy() for p in layer.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    y, dx, dw, db = results[0]
    dy_masked = np.where(y > 0, dy, 0)
    rdx, rdw, rdb = R.conv2d_backward(x, layer.weight.data, dy_masked, c["s"], c["p"],
                                      groups=layer.groups)
    assert_close(dx, rdx, dtype)
    assert_close(dw, rdw, dtype)
    assert_close(db, rdb, dtype)


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "plain"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", list(SPLITS))
def test_weight_grad_splits_match_reference_and_any_thread_count(split, dtype, groups,
                                                                 transposed, rng, threads,
                                                                 monkeypatch):
    """Every split of the weight gradient, its product taken transposed (K = 72 or 36 >
    out channels per group: the default) or plain."""
    c = _case(7, 8, 6, 11, 10, k=3, s=(2, 1), p=1)
    layer = nn.Conv2d(8, 6, 3, stride=(2, 1), padding=1, groups=groups, dtype=dtype, seed=0,
                      fuse_relu=True)
    for name, value in SPLITS[split](layer.weight.data.nbytes).items():
        monkeypatch.setattr(conv_module, name, value)
    monkeypatch.setattr(conv_module, "TRANSPOSED_WEIGHT_GRAD", transposed)
    blocks, chunks = conv_module.weight_grad_split(7, groups, 8 // groups * 9,
                                                   layer.weight.data.nbytes)
    assert {"default": chunks == 7, "one chunk, blocks of K": chunks == 1 and blocks > 1,
            "3 chunks x blocks": chunks == 3 and blocks > 1}[split]
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((7, 6) + _out_hw(c)).astype(dtype)
    _same_for_any_thread_count_and_like_reference(layer, c, x, dy, dtype, threads)


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "plain"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", list(SPLITS))
def test_pointwise_layers_read_the_image_in_place(split, dtype, groups, transposed, rng,
                                                  threads, monkeypatch):
    """1x1, stride 1, no padding: no im2col columns (a placeholder workspace), the same
    results as the reference for any split of the weight gradient (its product transposed
    or plain) and thread count."""
    c = _case(7, 40, 6, 5, 9, k=1)   # K = 40: beyond the direct kernel's taps
    layer = nn.Conv2d(40, 6, 1, groups=groups, dtype=dtype, seed=0, fuse_relu=True)
    for name, value in SPLITS[split](layer.weight.data.nbytes).items():
        monkeypatch.setattr(conv_module, name, value)
    monkeypatch.setattr(conv_module, "TRANSPOSED_WEIGHT_GRAD", transposed)
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((7, 6, 5, 9)).astype(dtype)
    _same_for_any_thread_count_and_like_reference(layer, c, x, dy, dtype, threads)
    assert {name: w.shape[1] for name, w in layer._workspaces.items()
            if "cols" in name} == {"cols": 1, "weight_grad_cols": 1, "grad_cols": 1}


# Output rows per im2col tile (see Conv2d._tile_workspace), forced by its constants:
# the case's output is 6 rows of 10 pixels.
TILE_ROWS = {"whole image": {}, "one row": dict(TILE_BYTES=1, MIN_TILE_COLUMNS=1),
             "4 + 2 rows": dict(TILE_BYTES=1, MIN_TILE_COLUMNS=31)}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", list(TILE_ROWS))
def test_im2col_tiles_match_reference_and_any_thread_count(tiles, dtype, groups, rng, threads,
                                                           monkeypatch):
    c = _case(3, 8, 6, 11, 10, k=3, s=(2, 1), p=1)
    layer = nn.Conv2d(8, 6, 3, stride=(2, 1), padding=1, groups=groups, dtype=dtype, seed=0,
                      fuse_relu=True)
    for name, value in TILE_ROWS[tiles].items():
        monkeypatch.setattr(conv_module, name, value)
    g = layer._geometry((3, 8, 11, 10))
    rows, _ = layer._tile_workspace("cols", g, 1, layer.weight.data[0].size)
    assert rows == {"whole image": 6, "one row": 1, "4 + 2 rows": 4}[tiles]
    x = _input(c, rng, dtype)
    dy = rng.standard_normal((3, 6) + _out_hw(c)).astype(dtype)
    _same_for_any_thread_count_and_like_reference(layer, c, x, dy, dtype, threads)


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("groups, k", [(1, 9), (1, 576), (4, 144), (32, 9), (1, 4608)])
@pytest.mark.parametrize("weight_bytes", [36, 300_000, 9_437_184])
def test_weight_grad_split_bounds_the_parts(batch, groups, k, weight_bytes):
    blocks, chunks = conv_module.weight_grad_split(batch, groups, k, weight_bytes)
    assert 1 <= chunks <= batch
    assert chunks == 1 or chunks * weight_bytes <= conv_module.PARTS_BYTES
    block = -(-k // blocks)
    assert 1 <= blocks <= k and (blocks - 1) * block < k  # no empty block
    assert blocks == 1 or block >= conv_module.MIN_BLOCK_COLUMNS


@pytest.mark.parametrize("kernel", [3, 5])  # Winograd, im2col
def test_backward_scratch_does_not_grow_with_the_batch(rng, kernel):
    """No per-image copy of the weight: the layer's own scratch is the same at batch 64 and
    256, and within its bound of three im2col tiles per thread (Winograd's large
    scratch comes from the shared pool), and the weight-gradient parts (from the
    pool) stay within PARTS_BYTES."""
    layer = nn.Conv2d(64, 64, kernel, padding=kernel // 2, bias=False, seed=0)
    sizes = []
    for batch in (64, 256):
        x = rng.standard_normal((batch, 64, 9, 9)).astype(np.float32)
        layer(x)
        layer.backward(np.ones((batch, 64, 9, 9), np.float32))
        sizes.append({name: a.nbytes for name, a in layer._workspaces.items()})
    assert sizes[0] == sizes[1]
    tile_bound = max(conv_module.TILE_BYTES,
                     layer.weight.data[0].nbytes * conv_module.MIN_TILE_COLUMNS)
    assert sum(sizes[1].values()) <= 3 * cyconv.get_num_threads() * tile_bound
    assert conv_module.weight_grad_split(256, 1, 576, layer.weight.data.nbytes)[1] * \
        layer.weight.data.nbytes <= conv_module.PARTS_BYTES


@pytest.mark.parametrize("groups, kernel, stride", [(1, 3, 1), (1, 1, 1), (2, 3, 2), (4, 3, 1)])
def test_workspaces_are_sized_by_the_threads_the_kernels_get(groups, kernel, stride, rng,
                                                             threads):
    """With more threads than tasks (batch 1, few channels), no workspace keeps a slot for
    a thread that the kernel does not start."""
    threads(cyconv._threads.max_num_threads())
    layer = nn.Conv2d(4, 4, kernel, stride=stride, groups=groups, seed=0)
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    y = layer(x)
    layer.backward(np.ones_like(y))
    bands = -(-y.shape[2] // -(-y.shape[2] // 4))   # of a quarter of the output rows
    tasks = {"direct_rows": bands, "cols": 1,  # forward: bands of output rows, images
             "weight_grad_cols": groups, "grad_cols": groups,  # backward items
             "planes": 1, "runs": 1,  # depthwise forward: 4 small planes in one task
             "backward_planes": 4, "grad_planes": 4, "grad_runs": 4}  # by channel
    for name, array in layer._workspaces.items():
        if name in tasks:
            assert array.shape[0] <= tasks[name], name


@pytest.mark.parametrize("groups, kernel", [(1, 3), (1, 1), (4, 3)])
def test_workspaces_are_kept_from_one_step_to_the_next(groups, kernel, rng, threads):
    """Forward and backward own their workspaces: none is reallocated at the next step
    (one shared by both, with different shapes, would be reallocated every call)."""
    threads(2)
    layer = nn.Conv2d(4, 8, kernel, padding=1, groups=groups, seed=0, fuse_relu=True)
    x = rng.standard_normal((3, 4, 9, 11)).astype(np.float32)
    arrays = []
    for _ in range(2):
        y = layer(x)
        layer.backward(np.ones_like(y))
        arrays.append({name: id(a) for name, a in layer._workspaces.items()})
    assert arrays[0] == arrays[1]
