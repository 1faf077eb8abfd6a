"""SGD, Adam and AdamW against the PyTorch update rules (reference.py)."""
import copy

import numpy as np
import pytest

from cyconv import nn, optim

import reference as R
from conftest import DTYPES

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.02, momentum=0.5, dampening=0.1, weight_decay=0.05),
    dict(lr=0.02, momentum=0.8, weight_decay=0.05, nesterov=True),
]
ADAM_CONFIGS = [
    dict(),
    dict(lr=0.01),
    dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
]
ADAMW_CONFIGS = [
    dict(),
    dict(lr=0.01),
    dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.3),
    dict(lr=0.01, weight_decay=0.0),
]
ALL = ([("SGD", c) for c in SGD_CONFIGS] + [("Adam", c) for c in ADAM_CONFIGS]
       + [("AdamW", c) for c in ADAMW_CONFIGS])
REF = {"SGD": R.sgd_step, "Adam": R.adam_step, "AdamW": R.adamw_step}
DEFAULTS = {"SGD": {}, "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
            "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)}


def _id(v):
    name, cfg = v
    return name + "-" + "-".join(f"{k}={cfg[k]}" for k in cfg)


def _params(dtype, seed=0):
    """Two layers' worth of Parameters (matrix, vector, 4-d tensor, vector)."""
    lin = nn.Linear(5, 3, dtype=dtype, seed=seed)
    conv = nn.Conv2d(2, 3, 2, dtype=dtype, seed=seed + 1)
    return lin.parameters() + conv.parameters()


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("nsteps", [1, 6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_cfg", ALL, ids=_id)
def test_steps_match_reference(opt_cfg, dtype, nsteps, rng):
    name, cfg = opt_cfg
    params = _params(dtype)
    opt = getattr(optim, name)(params, **cfg)
    ref_kw = dict(DEFAULTS[name], **cfg)
    ref_p = [p.data.astype(np.float64) for p in params]
    states = [{} for _ in params]
    for _ in range(nsteps):
        for i, p in enumerate(params):
            g = rng.standard_normal(p.data.shape).astype(dtype)
            p.grad[...] = g
            ref_p[i] = REF[name](ref_p[i], g, states[i], **ref_kw)
        opt.step()
        for i, p in enumerate(params):
            assert p.data.dtype == dtype
            np.testing.assert_allclose(p.data, ref_p[i], **_tol(dtype))


def test_sgd_first_momentum_step_uses_raw_grad():
    # PyTorch: buf = grad on the first step (no dampening applied)
    (w,) = nn.Linear(1, 1, bias=False, dtype=np.float64, seed=0).parameters()
    w.data[...] = 1.0
    opt = optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.5)
    w.grad[...] = 2.0
    opt.step()
    np.testing.assert_allclose(w.data, 1.0 - 0.1 * 2.0)
    opt.step()  # buf = 0.9 * 2 + 0.5 * 2 = 2.8
    np.testing.assert_allclose(w.data, 0.8 - 0.1 * 2.8)


def test_adam_first_step_size_is_lr():
    # with bias correction the first Adam step is lr * sign(g) (up to eps)
    (w,) = nn.Linear(3, 1, bias=False, dtype=np.float64, seed=0).parameters()
    w.data[...] = 0.0
    w.grad[...] = np.array([[3.0, -0.5, 1e-3]])
    optim.Adam([w], lr=0.01).step()
    np.testing.assert_allclose(w.data, [[-0.01, 0.01, -0.01]], rtol=1e-4)


def test_zero_grad_and_lr_setter(rng):
    params = _params(np.float64)
    opt = optim.SGD(params, lr=0.1)
    for p in params:
        p.grad[...] = 1.0
    opt.zero_grad()
    for p in params:
        assert not np.any(p.grad)
    assert opt.lr == 0.1
    opt.lr = 0.5
    assert opt.lr == 0.5
    before = [p.data.copy() for p in params]
    for p in params:
        p.grad[...] = 1.0
    opt.step()
    for b, p in zip(before, params):
        np.testing.assert_allclose(p.data, b - 0.5)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_lr_change_mid_training(name, rng):
    params = _params(np.float64)
    opt = getattr(optim, name)(params, lr=0.01)
    ref_p = [p.data.copy() for p in params]
    states = [{} for _ in params]
    for step in range(4):
        if step == 2:
            opt.lr = 0.003
        lr = opt.lr
        for i, p in enumerate(params):
            g = rng.standard_normal(p.data.shape)
            p.grad[...] = g
            ref_p[i] = REF[name](ref_p[i], g, states[i], **dict(DEFAULTS[name], lr=lr))
        opt.step()
    for p, r in zip(params, ref_p):
        np.testing.assert_allclose(p.data, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("opt_cfg", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                     ("Adam", dict(lr=0.01, weight_decay=0.01)),
                                     ("AdamW", dict(lr=0.01))], ids=_id)
def test_optimizer_state_dict_round_trip(opt_cfg, rng):
    name, cfg = opt_cfg
    a_params, b_params = _params(np.float64), _params(np.float64)
    a = getattr(optim, name)(a_params, **cfg)
    grads = [[rng.standard_normal(p.data.shape) for p in a_params] for _ in range(6)]
    for step in range(3):
        for p, g in zip(a_params, grads[step]):
            p.grad[...] = g
        a.step()
    sd = a.state_dict()
    sd_copy = copy.deepcopy(sd)
    for pa, pb in zip(a_params, b_params):
        pb.data[...] = pa.data
    b = getattr(optim, name)(b_params, **dict(cfg, lr=0.123))
    b.load_state_dict(sd)
    assert b.lr == a.lr
    for step in range(3, 6):
        for pa, pb, g in zip(a_params, b_params, grads[step]):
            pa.grad[...] = g
            pb.grad[...] = g
        a.step()
        b.step()
    for pa, pb in zip(a_params, b_params):
        np.testing.assert_array_equal(pa.data, pb.data)
    # the state_dict is a snapshot: later steps did not change it
    _assert_nested_equal(sd, sd_copy)


@pytest.mark.parametrize("opt_cfg", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True,
                                                  weight_decay=0.01)),
                                     ("Adam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.01)),
                                     ("AdamW", dict(lr=0.01, eps=1e-6, weight_decay=0.2))], ids=_id)
def test_optimizer_load_state_dict_restores_hyperparameters(opt_cfg, rng):
    """Like torch.optim: the state_dict carries every hyperparameter, so an
    optimizer built with other settings continues exactly like the saved one."""
    name, cfg = opt_cfg
    a_params, b_params = _params(np.float64), _params(np.float64)
    a = getattr(optim, name)(a_params, **cfg)
    for p in a_params:
        p.grad[...] = rng.standard_normal(p.data.shape)
    a.step()
    for pa, pb in zip(a_params, b_params):
        pb.data[...] = pa.data
    b = getattr(optim, name)(b_params, lr=0.5)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a_params, b_params):
        pa.grad[...] = pb.grad[...] = rng.standard_normal(pa.data.shape)
    a.step()
    b.step()
    for pa, pb in zip(a_params, b_params):
        np.testing.assert_array_equal(pa.data, pb.data)


def _assert_nested_equal(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_nested_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_nested_equal(u, v)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("opt_cfg", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01,
                                                  nesterov=True)),
                                     ("Adam", dict(lr=0.01, weight_decay=0.01)),
                                     ("AdamW", dict(lr=0.01, weight_decay=0.05))], ids=_id)
def test_matches_torch(opt_cfg, rng):
    torch = pytest.importorskip("torch")
    name, cfg = opt_cfg
    params = _params(np.float64)
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    opt = getattr(optim, name)(params, **cfg)
    topt = getattr(torch.optim, name)(tparams, **cfg)
    for _ in range(5):
        for p, tp in zip(params, tparams):
            g = rng.standard_normal(p.data.shape)
            p.grad[...] = g
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------
# Moving average of the weights
# ---------------------------------------------------------------------------
def small_bn_model(dtype):
    return nn.Sequential(nn.Conv2d(2, 3, 3, dtype=dtype, seed=0), nn.BatchNorm2d(3, dtype=dtype),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2, dtype=dtype, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moving_average_matches_numpy(dtype, rng):
    model = small_bn_model(dtype)
    ema = optim.ExponentialMovingAverage(model, decay=0.8)
    expected = {key: value.astype(np.float64) for key, value in model.state_dict().items()}
    for t in range(1, 8):
        model.train()
        model(rng.standard_normal((4, 2, 5, 5)).astype(dtype))  # moves the BN statistics
        for p in model.parameters():
            p.data += rng.standard_normal(p.data.shape).astype(dtype)
        ema.update()
        d = min(0.8, (1 + t) / (10 + t))
        for key, value in model.state_dict().items():
            if value.dtype.kind == "f":
                expected[key] = d * expected[key] + (1 - d) * value
            else:
                expected[key] = value
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for key, value in ema.averages.items():
        assert value.dtype == model.state_dict()[key].dtype
        np.testing.assert_allclose(value, expected[key], rtol=tol, atol=tol, err_msg=key)
    assert ema.averages["1.num_batches_tracked"] == 7


def test_moving_average_swaps_in_and_back(rng):
    model = small_bn_model(np.float64)
    ema = optim.ExponentialMovingAverage(model, decay=0.5)
    for p in model.parameters():
        p.data += 1.0
    ema.update()
    own = model.state_dict()
    x = rng.standard_normal((3, 2, 5, 5))
    model.eval()
    with ema.averaged():
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(value, ema.averages[key])
        averaged_out = model(x).copy()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, own[key])   # own weights back
    reference = small_bn_model(np.float64)
    reference.load_state_dict(ema.averages)
    reference.eval()
    np.testing.assert_array_equal(reference(x), averaged_out)


def test_moving_average_state_round_trip_and_errors():
    model = small_bn_model(np.float32)
    ema = optim.ExponentialMovingAverage(model, decay=0.9)
    for p in model.parameters():
        p.data *= 2
    ema.update()
    other = optim.ExponentialMovingAverage(small_bn_model(np.float32), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.updates) == (0.9, 1)
    for key in ema.averages:
        np.testing.assert_array_equal(other.averages[key], ema.averages[key])
    with pytest.raises(ValueError, match="decay must be below 1"):
        optim.ExponentialMovingAverage(model, decay=1.0)
    state = ema.state_dict()
    del state["averages"]["0.bias"]
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict(state)
    state = ema.state_dict()
    state["averages"]["0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"'0.bias' expected shape \(3,\), got \(5,\)"):
        other.load_state_dict(state)


def test_a_parameter_listed_twice_is_refused():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="position 2 is the one at position 0 again"):
        optim.SGD([layer.weight, layer.bias, layer.weight], lr=0.1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_check_finite_refuses_a_nan_gradient_and_changes_no_weight(name):
    layer = nn.Linear(3, 2, dtype=np.float64, seed=0)
    opt = getattr(optim, name)(layer.parameters(), lr=0.1, check_finite=True)
    before = [p.data.copy() for p in layer.parameters()]
    layer.bias.grad[1] = np.nan
    with pytest.raises(FloatingPointError, match="parameter 1 .* holds NaN or inf; no weight"):
        opt.step()
    for p, b in zip(layer.parameters(), before):
        np.testing.assert_array_equal(p.data, b)
    assert opt.step_count == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr="0.1"), "lr to be a finite number"), (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"), (dict(lr=-1.0), "lr"),
    (dict(lr=0.1, momentum="0.9"), "momentum"), (dict(lr=0.1, weight_decay=float("nan")),
                                                 "weight_decay"),
])
def test_optimizer_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.SGD(nn.Linear(3, 2).parameters(), **kwargs)
