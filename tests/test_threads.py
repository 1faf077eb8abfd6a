"""Results must not depend on the number of threads: bitwise equality."""
import numpy as np
import pytest

import cyconv
from cyconv import nn, optim

from conftest import num_threads


def used(n):
    """The threads the kernels use when n are asked for: 1 in a build without OpenMP."""
    return n if cyconv._parallel.openmp_enabled() else 1


def test_set_get_num_threads(threads):
    threads(1)
    assert cyconv.get_num_threads() == 1
    threads(2)
    assert cyconv.get_num_threads() == used(2)


def test_num_threads_context_restores():
    old = cyconv.get_num_threads()
    with num_threads(1):
        assert cyconv.get_num_threads() == 1
    assert cyconv.get_num_threads() == old


def _net(dtype):
    cyconv.manual_seed(99)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=dtype),   # 16x16 -> 8x8
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),                                          # 4x4
        nn.Conv2d(4, 6, 3, padding=1, dtype=dtype),
        nn.Dropout(0.3, seed=7),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5, dtype=dtype),
    )


def _run(n, dtype):
    data = np.random.default_rng(0)
    x = data.standard_normal((5, 3, 16, 16)).astype(dtype)
    labels = data.integers(0, 5, 5)
    with num_threads(n):
        model = _net(dtype)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
        out = {}
        for step in range(2):
            opt.zero_grad()
            logits = model(x)
            out[f"logits{step}"] = logits.copy()
            out[f"loss{step}"] = np.array(loss_fn(logits, labels))
            out[f"dx{step}"] = model.backward(loss_fn.backward()).copy()
            for i, p in enumerate(model.parameters()):
                out[f"grad{step}_{i}"] = p.grad.copy()
            opt.step()
        for k, v in model.state_dict().items():
            out["sd_" + k] = np.array(v, copy=True)
        model.eval()
        out["eval"] = model(x).copy()
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_network_bitwise_thread_invariant(dtype):
    old = cyconv.get_num_threads()
    one = _run(1, dtype)
    two = _run(2, dtype)
    assert cyconv.get_num_threads() == old
    assert one.keys() == two.keys()
    for k in one:
        assert one[k].dtype == two[k].dtype
        assert np.array_equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"


def test_network_bitwise_three_threads():
    one = _run(1, np.float32)
    three = _run(3, np.float32)
    for k in one:
        assert np.array_equal(one[k], three[k]), f"{k} differs between 1 and 3 threads"


LAYERS = {
    "conv": lambda d: nn.Conv2d(4, 5, 3, stride=(2, 1), padding=1, dtype=d, seed=0),
    "conv_dil": lambda d: nn.Conv2d(4, 3, (2, 3), padding=(1, 2), dilation=2, dtype=d, seed=0),
    "bn": lambda d: nn.BatchNorm2d(4, dtype=d),
    "maxpool": lambda d: nn.MaxPool2d(3, stride=2, padding=1),
    "avgpool": lambda d: nn.AvgPool2d(3, stride=2, padding=1),
    "gap": lambda d: nn.AdaptiveAvgPool2d(1),
    "relu": lambda d: nn.ReLU(),
    "leaky": lambda d: nn.LeakyReLU(0.1),
    "dropout": lambda d: nn.Dropout(0.5, seed=3),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_bitwise_thread_invariant(name, dtype):
    data = np.random.default_rng(1)
    x = data.standard_normal((5, 4, 13, 12)).astype(dtype)
    results = []
    for n in (1, 2):
        with num_threads(n):
            layer = LAYERS[name](dtype)
            y = layer(x)
            dy = np.random.default_rng(2).standard_normal(y.shape).astype(dtype)
            dx = layer.backward(dy)
            results.append([y, dx] + [p.grad.copy() for p in layer.parameters()])
    for a, b in zip(*results):
        assert np.array_equal(a, b)


FUSED = {   # batch norm with what follows it, fused by Sequential into one kernel each way
    "bn_relu": lambda d: nn.Sequential(nn.BatchNorm2d(256, dtype=d), nn.ReLU()),
    "bn_relu6": lambda d: nn.Sequential(nn.BatchNorm2d(256, dtype=d), nn.ReLU6()),
    "bn_relu_pool": lambda d: nn.Sequential(nn.BatchNorm2d(256, dtype=d), nn.ReLU(),
                                            nn.MaxPool2d(2)),
}


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_norm_bitwise_thread_invariant(name):
    """Many channels of many small planes, so that the threads run through short loops
    side by side (a variable that a kernel shares between its threads by mistake shows
    up here), several times."""
    data = np.random.default_rng(4)
    x = data.standard_normal((64, 256, 4, 4)).astype(np.float32)
    results = {}
    for n in (1, 2, 3) + (2,) * 12:
        with num_threads(n):
            layer = FUSED[name](np.float32)
            y = layer(x)
            dy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
            dx = layer.backward(dy)
            outputs = [y, dx] + [p.grad.copy() for p in layer.parameters()]
        first = results.setdefault("first", outputs)
        for a, b in zip(first, outputs):
            assert np.array_equal(a, b), f"{name}: {n} threads differ from 1"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_loss_optim_bitwise_thread_invariant(dtype):
    data = np.random.default_rng(3)
    x = data.standard_normal((7, 33)).astype(dtype)
    labels = data.integers(0, 6, 7)
    results = []
    for n in (1, 2):
        with num_threads(n):
            layer = nn.Linear(33, 6, dtype=dtype, seed=0)
            opt = optim.Adam(layer.parameters(), lr=0.01)
            loss_fn = nn.CrossEntropyLoss()
            loss = loss_fn(layer(x), labels)
            dx = layer.backward(loss_fn.backward())
            grads = [p.grad.copy() for p in layer.parameters()]
            opt.step()
            results.append([np.array(loss), dx] + grads + [p.data.copy() for p in layer.parameters()])
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_thread_count_is_bounded_and_accepts_numpy_ints(threads):
    limit = cyconv.max_num_threads()
    assert limit == 4 * len(__import__("os").sched_getaffinity(0))
    for bad in (0, -1, limit + 1, 100000, 10**9, 2.0, "2", True, None):
        with pytest.raises(ValueError, match=f"expected an int from 1 to {limit}"):
            cyconv.set_num_threads(bad)
    threads(np.int64(2))
    assert cyconv.get_num_threads() == used(2) and type(cyconv.get_num_threads()) is int


def test_importing_cyconv_changes_neither_the_environment_nor_numpy_blas(tmp_path):
    """A fresh interpreter: os.environ and the thread count of every BLAS that numpy and
    scipy loaded are the same before and after `import cyconv` (and after a training step
    on several threads: the kernels hold BLAS at one thread only while they run)."""
    import subprocess
    import sys
    script = """
import os, json
import numpy, scipy.linalg
from threadpoolctl import threadpool_info
before = (dict(os.environ), {i["filepath"]: i["num_threads"] for i in threadpool_info()})
import cyconv
from cyconv import nn
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
cyconv.set_num_threads(2)
out = model(numpy.ones((2, 3, 8, 8), numpy.float32))
model.backward(numpy.ones_like(out))
after = (dict(os.environ), {i["filepath"]: i["num_threads"] for i in threadpool_info()
                            if i["filepath"] in before[1]})
print(json.dumps([before == after, sorted(set(before[0]) ^ set(after[0])), before[1], after[1]]))
"""
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
                        "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(__import__("pathlib").Path(cyconv.__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    same, changed_keys, before, after = __import__("json").loads(result.stdout)
    assert same, (changed_keys, before, after)
    assert any(count > 1 for count in before.values()) or len(
        __import__("os").sched_getaffinity(0)) == 1   # BLAS really had several threads
