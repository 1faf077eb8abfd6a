"""Layers that a container runs as one kernel pass: BatchNorm2d + ReLU + MaxPool2d(2)
(cyconv/_norm_pool.pyx) and BatchNorm2d + ReLU6; Conv2d + ReLU + MaxPool2d, whose
backward masks the pooled gradient; and in inference a BatchNorm2d (and a ReLU) folded
into the Conv2d before it.  The same results as the layers one by one (a
hook on any of them turns the fusion off), as the numpy reference and as finite
differences."""
import numpy as np
import pytest

import cyconv
from cyconv import _activation, _norm, _norm_pool, models, nn

import reference as R
from conftest import FD_TOL, assert_close, finite_difference, num_threads

# (N, C, H, W): even and odd sizes (the last row or column no window covers), 2x2 planes
SHAPES = [(2, 3, 8, 8), (3, 2, 7, 9), (1, 4, 2, 2), (2, 3, 5, 4), (4, 2, 6, 3), (2, 5, 17, 12)]
LAYERS = ["bn", "relu", "pool"]


def counted_calls(monkeypatch, module, name):
    """A list that gets the first argument's shape at every call of module.name."""
    calls = []
    kernel = getattr(module, name)

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that gets an entry for every call of the fused forward kernel."""
    return counted_calls(monkeypatch, _norm_pool, "batch_norm2d_relu_max_pool_forward")


def stage(channels, dtype, seed=0, hooked=None, pool=None):
    """BatchNorm2d (random weights of both signs, random running statistics) -> ReLU ->
    pool (MaxPool2d(2) by default); hooked: the name of a layer given a do-nothing forward
    hook, so that the three run one by one."""
    rng = np.random.default_rng(seed)
    bn = nn.BatchNorm2d(channels, dtype=dtype)
    bn.weight.data[...] = rng.uniform(-1.5, 1.5, channels)
    bn.bias.data[...] = rng.uniform(-0.5, 0.5, channels)
    bn.running_mean[...] = rng.standard_normal(channels)
    bn.running_var[...] = rng.uniform(0.5, 2, channels)
    model = nn.Sequential(bn, nn.ReLU(), pool or nn.MaxPool2d(2))
    if hooked is not None:
        model[LAYERS.index(hooked)].register_forward_hook(lambda *args: None)
    return model


def step(model, x, dy, input_grad=True):
    """(output, input gradient, parameter gradients, buffers) of one forward + backward."""
    model.zero_grad()
    y = model(x).copy()
    dx = model.backward(dy, input_grad=input_grad)
    return (y, None if dx is None else dx.copy(), [p.grad.copy() for p in model.parameters()],
            [np.array(b, copy=True) for _, b in model.named_buffers()])


def assert_same_step(fused, plain, dtype):
    """Outputs and buffers bitwise equal, gradients equal to rounding."""
    y, dx, grads, buffers = fused
    y0, dx0, grads0, buffers0 = plain
    np.testing.assert_array_equal(y, y0)
    for b, b0 in zip(buffers, buffers0):
        np.testing.assert_array_equal(b, b0)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for g, g0 in zip([dx] + grads, [dx0] + grads0):
        np.testing.assert_allclose(g, g0, rtol=rtol, atol=rtol * max(1, np.abs(g0).max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("hooked", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_stage_matches_the_layers_one_by_one(shape, training, hooked, dtype,
                                                   fused_calls, rng):
    fused, plain = stage(shape[1], dtype), stage(shape[1], dtype, hooked=hooked)
    fused.train(training)
    plain.train(training)
    for _ in range(2):   # the running statistics move twice alike
        x = (rng.standard_normal(shape) * 2 + 0.3).astype(dtype)
        dy = rng.standard_normal(fused.output_shape(shape)).astype(dtype)
        before = len(fused_calls)
        result = step(fused, x, dy)
        assert len(fused_calls) == before + 1
        assert_same_step(result, step(plain, x, dy), dtype)
        assert len(fused_calls) == before + 1, "a hook must turn the fusion off"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_fused_stage_matches_the_reference(shape, training, rng):
    model = stage(shape[1], np.float64, seed=1).train(training)
    bn = model[0]
    w, b, rm, rv = (np.array(a, copy=True) for a in (bn.weight.data, bn.bias.data,
                                                      bn.running_mean, bn.running_var))
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(model.output_shape(shape))
    y, dx, (dw, db), _ = step(model, x, dy)
    if training:
        normalised, rm, rv = R.batch_norm2d_train_forward(x, w, b, rm, rv)
    else:
        normalised = R.batch_norm2d_eval_forward(x, w, b, rm, rv)
    activated = R.relu_forward(normalised)
    assert_close(y, R.max_pool2d_forward(activated, 2)[0])
    assert_close(bn.running_mean, rm)
    assert_close(bn.running_var, rv)
    grad = R.relu_backward(normalised, R.max_pool2d_backward(activated, dy, 2))
    if training:
        rdx, rdw, rdb = R.batch_norm2d_train_backward(x, w, grad)
    else:
        rdx, rdw, rdb = R.batch_norm2d_eval_backward(x, w, bn.running_mean, bn.running_var, grad)
    assert_close(dx, rdx, scale=max(1.0, np.abs(rdx).max(), np.abs(dy).max()))
    assert_close(dw, rdw)
    assert_close(db, rdb)


@pytest.mark.parametrize("shape", [(2, 2, 4, 5), (1, 3, 3, 2)])
def test_fused_stage_finite_differences(shape, rng):
    model = stage(shape[1], np.float64, seed=2)
    x = rng.standard_normal(shape)
    weights = rng.standard_normal(model.output_shape(shape))
    _, dx, grads, _ = step(model, x, weights)

    def loss(_):
        with cyconv.no_grad():
            return (model(x) * weights).sum()

    np.testing.assert_allclose(dx, finite_difference(lambda v: (model(v) * weights).sum(), x),
                               **FD_TOL)
    for param, grad in zip(model.parameters(), grads):
        np.testing.assert_allclose(grad, finite_difference(loss, param.data), **FD_TOL)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_nan_wins_its_window_as_in_the_layers_one_by_one(training, dtype, fused_calls):
    x = np.linspace(-2, 2, 2 * 3 * 6 * 6).reshape(2, 3, 6, 6).astype(dtype)
    x[0, 0, 1, 1] = np.nan       # last of its window
    x[1, 1, 2, 3] = np.nan       # second of its window...
    x[1, 1, 3, 2] = -np.nan      # ...and a later NaN in the same window
    x[0, 2, 4, 0] = np.inf
    dy = np.ones((2, 3, 3, 3), dtype)
    fused, plain = (stage(3, dtype, hooked=h).train(training) for h in (None, "pool"))
    y, dx, grads, _ = step(fused, x, dy)
    y0, dx0, grads0, _ = step(plain, x, dy)
    assert len(fused_calls) == 1
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[1, 1, 1, 1])
    np.testing.assert_array_equal(y, y0)   # NaNs in the same places
    with cyconv.no_grad():   # the kernel's path without the argmax
        np.testing.assert_array_equal(fused(x), y)
    assert np.array_equal(np.isnan(dx), np.isnan(dx0))
    for g, g0 in zip(grads, grads0):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(g0))


def test_fused_stage_is_bitwise_thread_invariant(rng):
    x = rng.standard_normal((5, 7, 13, 10)).astype(np.float32)
    dy = rng.standard_normal((5, 7, 6, 5)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            results.append(step(stage(7, np.float32), x, dy))
    for other in results[1:]:
        for a, b in zip(results[0][:2] + tuple(results[0][2]), other[:2] + tuple(other[2])):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pool", [lambda: nn.MaxPool2d(2, stride=1), lambda: nn.MaxPool2d(3, 2),
                                  lambda: nn.MaxPool2d(2, padding=1), lambda: nn.AvgPool2d(2)],
                         ids=["stride1", "k3s2", "padded", "avg"])
def test_other_pools_are_not_fused_and_give_the_same_results(pool, fused_calls, rng):
    x = rng.standard_normal((2, 3, 7, 8))
    fused = stage(3, np.float64, pool=pool())
    plain = stage(3, np.float64, pool=pool(), hooked="relu")
    dy = rng.standard_normal(fused.output_shape(x.shape))
    assert_same_step(step(fused, x, dy), step(plain, x, dy), np.float64)
    assert not fused_calls


@pytest.fixture
def relu6_calls(monkeypatch):
    """A list that gets an entry for every call of ReLU6's own kernels."""
    calls = []

    def counted(kernel):
        return lambda *args: calls.append(kernel) or kernel(*args)

    monkeypatch.setattr(nn.ReLU6, "_kernels", tuple(map(counted, nn.ReLU6._kernels)))
    return calls


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 8, 8)])
def test_batchnorm_relu6_matches_the_layers_one_by_one(shape, training, dtype, relu6_calls,
                                                       rng):
    def model(hooked):
        bn = nn.BatchNorm2d(shape[1], dtype=dtype)
        bn.weight.data[...] = np.linspace(-4, 5, shape[1])   # outputs above 6 too
        layers = nn.Sequential(bn, nn.ReLU6()).train(training)
        if hooked:
            layers[1].register_forward_hook(lambda *args: None)
        return layers

    x = (rng.standard_normal(shape) * 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    fused = step(model(False), x, dy)
    assert not relu6_calls
    plain = step(model(True), x, dy)
    assert len(relu6_calls) == 2
    assert (fused[0] == 6).any() and (fused[0] == 0).any()
    assert_same_step(fused, plain, dtype)


def test_relu6_finite_differences_through_batchnorm(rng):
    bn = nn.BatchNorm2d(2, dtype=np.float64)
    bn.weight.data[...] = [3.0, -4.0]
    model = nn.Sequential(bn, nn.ReLU6())
    x = rng.standard_normal((3, 2, 4, 3))
    weights = rng.standard_normal(x.shape)
    _, dx, _, _ = step(model, x, weights)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (model(v) * weights).sum(), x),
                               **FD_TOL)


def test_a_batchnorm_subclass_is_not_fused(fused_calls, relu6_calls, rng):
    class Renamed(nn.BatchNorm2d):
        pass

    x = rng.standard_normal((2, 3, 4, 4))
    for activation in (nn.ReLU(), nn.ReLU6()):
        model = nn.Sequential(Renamed(3, dtype=np.float64), activation, nn.MaxPool2d(2))
        model(x)
        model.backward(np.ones((2, 3, 2, 2)))
    assert not fused_calls and len(relu6_calls) == 2


def test_no_grad_and_input_grad_false(rng):
    x = rng.standard_normal((2, 3, 6, 7))
    dy = rng.standard_normal((2, 3, 3, 3))
    fused, plain = stage(3, np.float64).eval(), stage(3, np.float64, hooked="bn").eval()
    with cyconv.no_grad():
        np.testing.assert_array_equal(fused(x), plain(x))
    _, dx, grads, _ = step(fused, x, dy, input_grad=False)
    _, dx0, grads0, _ = step(plain, x, dy, input_grad=False)
    assert dx is None and dx0 is None
    for g, g0 in zip(grads, grads0):
        np.testing.assert_allclose(g, g0, rtol=1e-12)


@pytest.mark.parametrize("inference", [False, True], ids=["train", "inference"])
def test_every_stage_of_the_small_network_is_fused(inference, fused_calls, rng):
    """In inference too: BatchNorm2d + ReLU + MaxPool2d in one pass beat folding the
    BatchNorm2d into the conv before, so the conv leaves them whole."""
    model = models.small(3, 32).train(not inference)   # below 128 px: no stem, four
    keys = list(model.state_dict())                     # stages of 32 -> 2 px
    with cyconv.no_grad() if inference else cyconv.enable_grad():
        model(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert [shape[2] for shape in fused_calls] == [32, 16, 8, 4]
    assert list(model.state_dict()) == keys
    assert "1.running_mean" in keys   # the layers keep their names


def test_errors_name_the_layer_that_refused(fused_calls):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match="^3: MaxPool2d: input of size 1x4"):
        model(np.zeros((1, 3, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"^1: BatchNorm2d: expected input of shape \(N, 3"):
        model[1:](np.zeros((1, 4, 4, 4), np.float32))   # slices keep the names
    assert not fused_calls


# A Conv2d on each of its forward paths: (in_channels, layer)
FOLDED_CONVS = {
    "winograd": (8, lambda bias, dtype: nn.Conv2d(8, 8, 3, padding=1, bias=bias, dtype=dtype,
                                                  seed=1)),
    "im2col": (6, lambda bias, dtype: nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=bias,
                                                dtype=dtype, seed=1)),
    "direct": (3, lambda bias, dtype: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias,
                                                dtype=dtype, seed=1)),
    "depthwise": (6, lambda bias, dtype: nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=bias,
                                                   dtype=dtype, seed=1)),
    "grouped": (6, lambda bias, dtype: nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=bias,
                                                 dtype=dtype, seed=1)),
    "subsample": (6, lambda bias, dtype: nn.Conv2d(6, 10, 1, stride=2, bias=bias, dtype=dtype,
                                                   seed=1)),
}


@pytest.fixture
def batchnorm_calls(monkeypatch):
    """A list that gets an entry for every call of BatchNorm2d's eval-mode kernel."""
    return counted_calls(monkeypatch, _norm, "batch_norm2d_forward_eval")


ACTIVATIONS = {"none": [], "relu": [nn.ReLU], "relu6": [nn.ReLU6]}


def conv_bn(path, bias, dtype, activation="relu", seed=0):
    """(in_channels, Sequential(Conv2d, BatchNorm2d with random statistics[, activation]))
    in eval mode."""
    channels, make = FOLDED_CONVS[path]
    conv = make(bias, dtype)
    bn = stage(conv.out_channels, dtype, seed)[0]
    layers = [conv, bn] + [layer() for layer in ACTIVATIONS[activation]]
    return channels, nn.Sequential(*layers).eval()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("path", list(FOLDED_CONVS))
def test_inference_folds_batchnorm_into_the_conv(path, bias, activation, dtype,
                                                 batchnorm_calls, relu6_calls, rng):
    channels, model = conv_bn(path, bias, dtype, activation)
    x = 10 * rng.standard_normal((2, channels, 9, 11)).astype(dtype)
    x[1, 0, 4, 4] = np.nan   # kept through the activations, as by the layers one by one
    #                          (a pixel that the stride-2 layers read too)
    parameters = [p.data.copy() for p in model.parameters()]
    with cyconv.no_grad():
        expected = x
        for layer in model:   # one by one: nothing to fold
            expected = layer(expected)
        calls = len(batchnorm_calls), len(relu6_calls)
        y = model(x)
    assert (len(batchnorm_calls), len(relu6_calls)) == calls   # folded, the activation fused
    assert_close(y, expected, dtype)
    assert np.isnan(y).any() and not np.isnan(y).all()
    if activation != "none":
        assert (y == 0).any() and (y > 0).any()
    if activation == "relu6":
        assert (y == 6).any() and np.nanmax(y) == 6
    for p, before in zip(model.parameters(), parameters):
        np.testing.assert_array_equal(p.data, before)


def test_batchnorm_is_folded_only_in_inference_and_without_hooks(batchnorm_calls, rng):
    _, model = conv_bn("winograd", True, np.float64)
    x = rng.standard_normal((2, 8, 6, 7))
    with cyconv.no_grad():
        folded = model(x)
    assert not batchnorm_calls
    y = model(x)   # eval mode with gradients: BatchNorm2d runs, and backward works
    assert len(batchnorm_calls) == 1
    assert_close(y, folded, np.float64)
    assert model.backward(np.ones_like(y)).shape == x.shape
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with cyconv.no_grad():
        assert_close(model(x), folded, np.float64)
    assert len(batchnorm_calls) == 2 and seen[0].shape == (2, 8, 6, 7)   # the conv's output
    model.train()
    with cyconv.no_grad():
        model(x)
    assert len(batchnorm_calls) == 2   # training mode: batch statistics, another kernel


def test_a_folded_batchnorm_of_other_channels_names_itself(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5), nn.ReLU()).eval()
    with cyconv.no_grad(), pytest.raises(ValueError, match=r"^1: BatchNorm2d: expected input "
                                                           r"of shape \(N, 5"):
        model(rng.standard_normal((1, 3, 5, 5)).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_shape", [(7, 5, 3, 3), (37, 1, 3, 3), (3, 11, 1, 1), (67, 65, 3, 3)])
def test_folded_weight_is_each_product_in_double_rounded_once(weight_shape, dtype, rng):
    bn = nn.BatchNorm2d(weight_shape[0], dtype=dtype).eval()
    bn.weight.data[:] = rng.uniform(0.5, 2, weight_shape[0])
    bn.running_var[:] = rng.uniform(0.1, 3, weight_shape[0])
    bn.running_mean[:] = rng.standard_normal(weight_shape[0])
    weight = rng.standard_normal(weight_shape).astype(dtype)
    bias = rng.standard_normal(weight_shape[0]).astype(dtype)
    scale = bn.weight.data / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    expected = (weight.astype(np.float64) * scale[:, None, None, None]).astype(dtype)
    for threads in (1, 2, 3):
        with num_threads(threads):
            folded, shift = bn._folded(weight, bias, np.full_like(weight, np.nan))
        np.testing.assert_array_equal(folded, expected)
        np.testing.assert_array_equal(shift, (bn.bias.data + (bias - bn.running_mean) * scale)
                                      .astype(dtype))


POOLS = {"2x2": lambda: nn.MaxPool2d(2), "k3s2p1": lambda: nn.MaxPool2d(3, 2, padding=1),
         "k2s1": lambda: nn.MaxPool2d(2, stride=1)}


def conv_relu_pool(path, pool, dtype, hooked=False):
    """(in_channels, Sequential(Conv2d, ReLU, MaxPool2d)); hooked: the pool has a forward
    hook, so that the conv absorbs the ReLU only and masks the gradient by its own output."""
    channels, make = FOLDED_CONVS[path]
    model = nn.Sequential(make(True, dtype), nn.ReLU(), POOLS[pool]())
    if hooked:
        model[2].register_forward_hook(lambda *args: None)
    return channels, model


@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "weights_only"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("path", list(FOLDED_CONVS))
def test_conv_relu_maxpool_gives_the_bits_of_the_conv_masking_its_own_output(
        path, pool, dtype, input_grad, monkeypatch, rng):
    """The pooled gradient masked where the pooled output is <= 0 and spread to the
    windows' maxima is the full-size gradient masked by the conv's output, element for
    element, so every result is the same to the bit; a NaN stays a NaN."""
    mask_calls = counted_calls(monkeypatch, _activation, "relu_backward")
    channels, fused = conv_relu_pool(path, pool, dtype)
    _, plain = conv_relu_pool(path, pool, dtype, hooked=True)
    x = rng.standard_normal((3, channels, 11, 13)).astype(dtype)
    x[1, 0, 4, 4] = np.nan   # (a pixel that the stride-2 layers read too)
    dy = rng.standard_normal(fused.output_shape(x.shape)).astype(dtype)
    result = step(fused, x, dy, input_grad)
    assert mask_calls == [(dy.size,)], "the pooled gradient is masked, once"
    expected = step(plain, x, dy, input_grad)
    assert len(mask_calls) == 1, "the conv masks the gradient in its own kernels"
    y, dx, grads, _ = result
    assert np.isnan(y).any() and (y == 0).any() and (y > 0).any()
    for got, want in zip([y, dx] + grads, expected[:2] + tuple(expected[2])):
        np.testing.assert_array_equal(got, want)


def test_conv_relu_maxpool_matches_the_reference_and_finite_differences(rng):
    _, model = conv_relu_pool("im2col", "k3s2p1", np.float64)
    conv = model[0]
    x = rng.standard_normal((2, 6, 9, 8))
    weights = rng.standard_normal(model.output_shape(x.shape))
    y, dx, _, _ = step(model, x, weights)
    z = R.conv2d_forward(x, conv.weight.data, conv.bias.data, 2, 1)
    np.testing.assert_allclose(y, R.max_pool2d_forward(np.maximum(z, 0), 3, 2, 1)[0],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (model(v) * weights).sum(), x),
                               **FD_TOL)


def test_conv_relu_maxpool_is_bitwise_thread_invariant(rng):
    _, model = conv_relu_pool("direct", "2x2", np.float32)
    x = rng.standard_normal((5, 3, 17, 15)).astype(np.float32)
    dy = rng.standard_normal(model.output_shape(x.shape)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            results.append(step(model, x, dy))
    for other in results[1:]:
        for a, b in zip(results[0][:2] + tuple(results[0][2]), other[:2] + tuple(other[2])):
            np.testing.assert_array_equal(a, b)


def test_conv_relu_maxpool_errors_name_the_pool():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match="^2: MaxPool2d: input of size 1x2"):
        model(np.zeros((1, 3, 3, 4), np.float32))
    model(np.zeros((1, 3, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"^2: MaxPool2d.backward: expected a gradient of "
                                         r"shape \(1, 3, 1, 2\)"):
        model.backward(np.zeros((1, 3, 2, 1), np.float32))
