"""Sequential, state_dict, no_grad, PyTorch parity and overfitting."""
import numpy as np
import pytest

import cyconv
from cyconv import nn, optim

import reference as R
from conftest import assert_msg_mentions, finite_difference


def small_net(dtype=np.float32, seed=None):
    """Conv2d(3,8,3,p=1) BN ReLU MaxPool2d(2) Flatten Linear -> 4 classes (16x16 inputs)."""
    kw = {} if seed is None else dict(seed=seed)
    kl = {} if seed is None else dict(seed=seed + 1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, dtype=dtype, **kw),
        nn.BatchNorm2d(8, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4, dtype=dtype, **kl),
    )


def wide_net(dtype=np.float64):
    """Uses every layer type (but dropout) on 3x11x13 inputs."""
    cyconv.manual_seed(1234)
    return nn.Sequential(
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype),  # 6x12
        nn.BatchNorm2d(4, dtype=dtype),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2, stride=1, padding=1),                                  # 7x13
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False, dtype=dtype),    # 7x13
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),                                  # 4x7
        nn.Conv2d(4, 5, 1, dtype=dtype),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3, dtype=dtype),
    )


def torch_wide_net(torch):
    T = torch.nn
    return T.Sequential(
        T.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), T.BatchNorm2d(4), T.LeakyReLU(0.1),
        T.AvgPool2d(2, stride=1, padding=1),
        T.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), T.BatchNorm2d(4), T.ReLU(),
        T.MaxPool2d(3, stride=2, padding=1), T.Conv2d(4, 5, 1), T.AdaptiveAvgPool2d(1),
        T.Flatten(), T.Linear(5, 3)).double()


# ----------------------------------------------------------------------------
# Sequential basics
# ----------------------------------------------------------------------------
def test_sequential_container():
    layers = [nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)]
    model = nn.Sequential(*layers)
    assert len(model) == 3
    assert model[0] is layers[0] and model[2] is layers[2]
    assert list(model) == layers
    assert len(model.parameters()) == 4
    assert model.parameters()[0] is layers[0].parameters()[0]
    assert model.parameters()[3] is layers[2].parameters()[1]


def test_sequential_forward_backward_is_composition(rng):
    model = wide_net()
    x = rng.standard_normal((2, 3, 11, 13))
    with cyconv.no_grad():   # forwards that are not backpropagated
        y = model(x)
        h = x
        for layer in model:
            h = layer(h)
    np.testing.assert_array_equal(y, h)
    assert y.shape == (2, 3)
    dy = rng.standard_normal(y.shape)
    model.zero_grad()
    model(x)
    dx = model.backward(dy)
    g_model = [p.grad.copy() for p in model.parameters()]
    # by hand, layer by layer
    model.zero_grad()
    acts = [x]
    for layer in model:
        acts.append(layer(acts[-1]))
    g = dy
    for layer in reversed(list(model)):
        g = layer.backward(g)
    np.testing.assert_array_equal(dx, g)
    for a, p in zip(g_model, model.parameters()):
        np.testing.assert_array_equal(a, p.grad)
    # input_grad=False: no input gradient, the same parameter gradients (the first
    # layer's, of 18 taps, then come from the direct kernel: the same to rounding)
    model.zero_grad()
    model(x)
    assert model.backward(dy, input_grad=False) is None
    first = {id(p) for p in model[0].parameters()}
    for a, p in zip(g_model, model.parameters()):
        if id(p) in first:
            np.testing.assert_allclose(p.grad, a, rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_array_equal(a, p.grad)


def test_train_eval_propagate():
    model = small_net()
    assert model.training and all(layer.training for layer in model)
    model.eval()
    assert not model.training and not any(layer.training for layer in model)
    model.train()
    assert model.training and all(layer.training for layer in model)


def test_param_grads_accumulate_through_sequential(rng):
    model = wide_net()
    x = rng.standard_normal((2, 3, 11, 13))
    dy = rng.standard_normal((2, 3))
    model.zero_grad()
    model(x)
    model.backward(dy)
    g1 = [p.grad.copy() for p in model.parameters()]
    model(x)
    model.backward(dy)
    for g, p in zip(g1, model.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-10, atol=1e-14)


def test_model_finite_differences(rng):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=np.float64, seed=0),
                          nn.BatchNorm2d(3, dtype=np.float64), nn.LeakyReLU(0.1),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 3, dtype=np.float64, seed=1))
    x = rng.standard_normal((2, 2, 5, 6))
    labels = np.array([0, 2])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.zero_grad()
    loss_fn(model(x), labels)
    dx = model.backward(loss_fn.backward())
    grads = [p.grad.copy() for p in model.parameters()]
    f = lambda v: loss_fn(model(v), labels)
    np.testing.assert_allclose(dx, finite_difference(f, x), rtol=1e-5, atol=1e-8)
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_allclose(g, finite_difference(lambda _: loss_fn(model(x), labels), p.data),
                                   rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------
EXPECTED_KEYS = [
    ("0.weight", (8, 3, 3, 3)), ("0.bias", (8,)),
    ("1.weight", (8,)), ("1.bias", (8,)), ("1.running_mean", (8,)), ("1.running_var", (8,)),
    ("1.num_batches_tracked", ()),
    ("5.weight", (4, 512)), ("5.bias", (4,)),
]


def test_state_dict_keys_and_shapes():
    sd = small_net().state_dict()
    assert [(k, tuple(np.shape(v))) for k, v in sd.items()] == EXPECTED_KEYS
    assert np.asarray(sd["1.num_batches_tracked"]).dtype == np.int64


def test_state_dict_matches_torch_keys():
    torch = pytest.importorskip("torch")
    T = torch.nn
    tm = T.Sequential(T.Conv2d(3, 8, 3, padding=1), T.BatchNorm2d(8), T.ReLU(), T.MaxPool2d(2),
                      T.Flatten(), T.Linear(512, 4))
    sd = small_net().state_dict()
    assert list(sd) == list(tm.state_dict())
    # strict load into torch must succeed
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})


def test_state_dict_round_trip(rng):
    a, b = small_net(seed=1), small_net(seed=2)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    a(x)  # move running stats away from the init
    sd = a.state_dict()
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    for m in (a, b):
        m.eval()
    np.testing.assert_array_equal(a(x), b(x))
    a.train()
    b.train()
    np.testing.assert_array_equal(a(x), b(x))


def test_state_dict_is_a_copy(rng):
    model = small_net(seed=0)
    sd = model.state_dict()
    w0 = model[0].parameters()[0].data.copy()
    sd["0.weight"][...] = 123.0
    np.testing.assert_array_equal(model[0].parameters()[0].data, w0)
    other = small_net(seed=5)
    sd2 = other.state_dict()
    model.load_state_dict(sd2)
    sd2["0.weight"][...] = -7.0  # mutating after loading must not leak into the model
    np.testing.assert_array_equal(model[0].parameters()[0].data, other[0].parameters()[0].data)


def test_load_state_dict_keeps_parameter_objects(rng):
    # optimizers hold Parameter objects: loading must update them in place
    model = small_net(seed=0)
    params = model.parameters()
    opt = optim.SGD(params, lr=0.1)
    model.load_state_dict(small_net(seed=3).state_dict())
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    model.zero_grad()
    y = model(x)
    model.backward(np.ones_like(y))
    before = model[5].parameters()[1].data.copy()
    g = model[5].parameters()[1].grad.copy()
    opt.step()
    np.testing.assert_allclose(model[5].parameters()[1].data, before - 0.1 * g, rtol=1e-6)


def test_load_state_dict_missing_key():
    model = small_net()
    sd = model.state_dict()
    del sd["1.running_var"]
    with pytest.raises((KeyError, ValueError, RuntimeError)) as ei:
        model.load_state_dict(sd)
    assert_msg_mentions(ei, "1.running_var")


def test_load_state_dict_unexpected_key():
    model = small_net()
    sd = model.state_dict()
    sd["7.weight"] = np.zeros(3, np.float32)
    with pytest.raises((KeyError, ValueError, RuntimeError)) as ei:
        model.load_state_dict(sd)
    assert_msg_mentions(ei, "7.weight")


@pytest.mark.parametrize("key,bad", [("0.weight", (8, 3, 5, 5)), ("5.weight", (512, 4)),
                                     ("1.running_mean", (7,))])
def test_load_state_dict_wrong_shape(key, bad):
    model = small_net(seed=0)
    sd = model.state_dict()
    good = tuple(sd[key].shape)
    sd[key] = np.zeros(bad, np.float32)
    with pytest.raises((ValueError, RuntimeError)) as ei:
        model.load_state_dict(sd)
    assert_msg_mentions(ei, key, good, bad)


# ----------------------------------------------------------------------------
# no_grad
# ----------------------------------------------------------------------------
def test_no_grad(rng):
    model = wide_net()
    model.eval()
    x = rng.standard_normal((2, 3, 11, 13))
    y_grad = model(x)
    with cyconv.no_grad():
        y_nograd = model(x)
    np.testing.assert_array_equal(y_grad, y_nograd)
    with pytest.raises(RuntimeError):
        model.backward(np.ones_like(y_nograd))
    # grad mode is back after the block
    model(x)
    assert model.backward(np.ones_like(y_grad)).shape == x.shape


def test_no_grad_single_layer_and_nesting(rng):
    layer = nn.Conv2d(2, 2, 3, dtype=np.float64, seed=0)
    x = rng.standard_normal((1, 2, 5, 5))
    with cyconv.no_grad():
        with cyconv.no_grad():
            layer(x)
        layer(x)  # still in no_grad after the inner block exits
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((1, 2, 3, 3)))


def test_no_grad_restored_after_exception(rng):
    layer = nn.Linear(3, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((2, 3))
    with pytest.raises(ZeroDivisionError), cyconv.no_grad():
        1 / 0
    layer(x)
    layer.backward(np.ones((2, 2)))  # must not raise


def test_no_grad_train_mode_bn_still_updates_like_forward(rng):
    # in torch, no_grad does not change train-mode semantics
    a, b = small_net(seed=0), small_net(seed=0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    ya = a(x)
    with cyconv.no_grad():
        yb = b(x)
    np.testing.assert_array_equal(ya, yb)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


# ----------------------------------------------------------------------------
# Initialisation / seeding
# ----------------------------------------------------------------------------
def test_manual_seed_builds_identical_models():
    cyconv.manual_seed(0)
    a = small_net()
    c = small_net()
    cyconv.manual_seed(0)
    b = small_net()
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(),
                               c.state_dict().values()):
        np.testing.assert_array_equal(va, vb, err_msg=k)
    assert not np.array_equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


# ----------------------------------------------------------------------------
# PyTorch parity
# ----------------------------------------------------------------------------
def _torch_pair(torch, dtype):
    torch.manual_seed(0)
    tm = torch_wide_net(torch)
    if dtype == np.float32:
        tm = tm.float()
    model = wide_net(dtype)
    # give BN non-trivial parameters and statistics in torch, then copy over
    with torch.no_grad():
        for m in tm:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    model.load_state_dict({k: v.numpy().copy() for k, v in tm.state_dict().items()})
    return model, tm


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torch(mode, dtype, rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    model, tm = _torch_pair(torch, dtype)
    getattr(model, mode)()
    getattr(tm, mode)()
    x = rng.standard_normal((3, 3, 11, 13)).astype(dtype)
    labels = np.array([2, 0, 1])
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tm(tx)
    tl = torch.nn.functional.cross_entropy(ty, torch.from_numpy(labels), label_smoothing=0.1)
    tl.backward()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.zero_grad()
    y = model(x)
    loss = loss_fn(y, labels)
    dx = model.backward(loss_fn.backward())
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    assert abs(loss - tl.item()) <= tol["rtol"] * 10
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    tparams = [p for p in tm.parameters()]
    assert len(tparams) == len(model.parameters())
    for i, (p, tp) in enumerate(zip(model.parameters(), tparams)):
        scale = max(1.0, float(tp.grad.abs().max()))
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=tol["rtol"],
                                   atol=tol["atol"] * scale, err_msg=f"param {i}")
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(np.asarray(model.state_dict()[k], dtype=np.float64),
                                   v.double().numpy(), rtol=tol["rtol"], atol=tol["atol"], err_msg=k)


@pytest.mark.parametrize("H,W", [(7, 7), (9, 5), (11, 13), (5, 6), (15, 8)])
@pytest.mark.parametrize("spec", [
    ("conv", dict(kernel_size=3, stride=2, padding=1)),
    ("conv", dict(kernel_size=(2, 3), stride=(3, 2), padding=(0, 1), dilation=(2, 1))),
    ("conv", dict(kernel_size=4, stride=3, padding=2)),
    ("conv", dict(kernel_size=1, stride=2)),
    ("max", dict(kernel_size=3, stride=2, padding=1)),
    ("max", dict(kernel_size=2)),
    ("avg", dict(kernel_size=3, stride=2)),
    ("avg", dict(kernel_size=4, stride=3, padding=2)),
], ids=lambda s: s[0] + "-" + "-".join(f"{k}{v}" for k, v in s[1].items()))
def test_output_shapes_match_torch(spec, H, W):
    torch = pytest.importorskip("torch")
    kind, kw = spec
    x = np.zeros((2, 3, H, W), np.float32)
    if kind == "conv":
        ours, theirs = nn.Conv2d(3, 2, **kw), torch.nn.Conv2d(3, 2, **kw)
    elif kind == "max":
        ours, theirs = nn.MaxPool2d(**kw), torch.nn.MaxPool2d(**kw)
    else:
        ours, theirs = nn.AvgPool2d(**kw), torch.nn.AvgPool2d(**kw)
    try:
        expected = tuple(theirs(torch.from_numpy(x)).shape)
    except RuntimeError:  # output would be empty: we must refuse too
        with pytest.raises(ValueError):
            ours(x)
        return
    assert ours(x).shape == expected


# ----------------------------------------------------------------------------
# Overfitting a fixed batch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name,kw", [("SGD", dict(lr=0.05, momentum=0.9)),
                                         ("Adam", dict(lr=0.01)),
                                         ("AdamW", dict(lr=0.01))])
def test_overfit_fixed_batch(opt_name, kw):
    data_rng = np.random.default_rng(2024)
    x = data_rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = data_rng.integers(0, 4, 8)
    cyconv.manual_seed(0)
    model = small_net()
    opt = getattr(optim, opt_name)(model.parameters(), **kw)
    loss_fn = nn.CrossEntropyLoss()
    losses, acc = [], 0.0
    for step in range(300):
        opt.zero_grad()
        logits = model(x)
        losses.append(loss_fn(logits, labels))
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        acc = float((logits.argmax(axis=1) == labels).mean())
        if acc == 1.0 and losses[-1] < 0.01:
            break
    assert all(np.isfinite(losses))
    assert acc == 1.0, (step, losses[-5:])
    assert losses[-1] < 0.01, losses[-5:]
    assert losses[-1] < 0.1 * losses[0]


# ----------------------------------------------------------------------------
# returned arrays are not scratch buffers that later calls overwrite
# ----------------------------------------------------------------------------
LAYERS = {
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64, seed=0), (2, 2, 5, 5)),
    "conv_relu_seq": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dtype=np.float64, seed=0),
                                            nn.ReLU()), (2, 2, 5, 5)),
    "bn": (lambda: nn.BatchNorm2d(2, dtype=np.float64), (2, 2, 3, 3)),
    "linear": (lambda: nn.Linear(4, 3, dtype=np.float64, seed=0), (2, 4)),
    "maxpool": (lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    "avgpool": (lambda: nn.AvgPool2d(2), (2, 2, 4, 4)),
    "gap": (lambda: nn.AdaptiveAvgPool2d(1), (2, 2, 4, 4)),
    "relu": (nn.ReLU, (2, 2, 3, 3)),
    "leaky": (nn.LeakyReLU, (2, 2, 3, 3)),
    "dropout": (lambda: nn.Dropout(0.5, seed=0), (2, 2, 3, 3)),
    "flatten": (nn.Flatten, (2, 2, 3, 3)),
    "wide_net": (wide_net, (2, 3, 11, 13)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_returned_arrays_survive_later_calls(name, rng):
    factory, shape = LAYERS[name]
    layer = factory()
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape)
    x1_copy = x1.copy()
    y1 = layer(x1)
    y1_copy = y1.copy()
    dy1 = rng.standard_normal(y1.shape)
    dx1 = layer.backward(dy1)
    dx1_copy = dx1.copy()
    y2 = layer(x2)
    layer.backward(rng.standard_normal(y2.shape))
    np.testing.assert_array_equal(y1, y1_copy)
    np.testing.assert_array_equal(dx1, dx1_copy)
    np.testing.assert_array_equal(x1, x1_copy)


def test_loss_gradient_survives_later_calls(rng):
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(rng.standard_normal((3, 4)), np.array([0, 1, 2]))
    g1 = loss_fn.backward()
    g1_copy = g1.copy()
    loss_fn(rng.standard_normal((3, 4)), np.array([3, 1, 0]))
    loss_fn.backward()
    np.testing.assert_array_equal(g1, g1_copy)


def test_sequential_conv_relu_matches_layer_by_layer(rng):
    """Sequential may fuse Conv2d + ReLU internally; results must not change."""
    cyconv.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, stride=2, dtype=np.float64), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 2, dtype=np.float64))
    x = rng.standard_normal((2, 2, 5, 5))
    with cyconv.no_grad():   # forwards that are not backpropagated
        y = model(x)
        h = x
        for layer in model:
            h = layer(h)
        np.testing.assert_array_equal(y, h)
        conv0 = model[0].parameters()
        a0 = R.conv2d_forward(x, conv0[0].data, conv0[1].data, padding=1)
        np.testing.assert_allclose(model[1](model[0](x)), R.relu_forward(a0), rtol=1e-12,
                                   atol=1e-14)
    loss_fn = nn.CrossEntropyLoss()
    labels = np.array([1, 0])
    model.zero_grad()
    loss_fn(model(x), labels)
    dx = model.backward(loss_fn.backward())
    grads = [p.grad.copy() for p in model.parameters()]
    f = lambda v: loss_fn(model(v), labels)
    np.testing.assert_allclose(dx, finite_difference(f, x), rtol=1e-5, atol=1e-8)
    p0 = model.parameters()[0]
    np.testing.assert_allclose(grads[0], finite_difference(lambda _: f(x), p0.data),
                               rtol=1e-5, atol=1e-8)


def test_predict_with_flip_averages_the_probabilities_of_the_mirror_image(rng):
    """predict(flip=True): logits whose softmax is the mean of the model's softmax on the
    image and on its mirror image; an image and its mirror image get the same bits."""
    def softmax(logits):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    model = wide_net(np.float64)
    x = rng.standard_normal((3, 3, 11, 13))
    mirrored = x[..., ::-1].copy()
    logits = cyconv.predict(model, x, flip=True)
    model.eval()
    with cyconv.no_grad():
        expected = (softmax(model(x)) + softmax(model(mirrored))) / 2
    np.testing.assert_allclose(softmax(logits), expected, rtol=1e-12, atol=1e-15)
    assert np.array_equal(cyconv.predict(model, mirrored, flip=True), logits)
    assert not np.allclose(cyconv.predict(model, x), logits)     # the mirror image counts
    assert cyconv.predict(wide_net(np.float32), x, flip=True).dtype == np.float32
    with pytest.raises(TypeError, match="flip must be True or False, got 'yes'"):
        cyconv.predict(model, x, flip="yes")


def test_predict_keeps_the_model_dtype_and_mode(rng):
    """cyconv.predict on a float64 model gives float64 logits, and leaves the model in the
    mode it found it in (review finding 3)."""
    model = wide_net(np.float64)
    x = rng.standard_normal((3, 3, 11, 13))
    logits = cyconv.predict(model, x)
    assert logits.dtype == np.float64 and model.training
    model.eval()
    # predict runs in inference, where each BatchNorm2d folds into the Conv2d before
    # it: the same logits as eval mode with gradients on, to rounding
    np.testing.assert_allclose(logits, model(x), rtol=1e-12, atol=1e-14)
    photos = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    model.image_size = (11, 13)
    assert cyconv.predict(model, photos).shape == (2, 3) and not model.training
