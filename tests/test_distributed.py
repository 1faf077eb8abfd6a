"""cyconv.distributed: sharding, SyncBatchNorm's kernels (in this process), and under
``mpirun -n 2`` (tests/distributed_job.py; MPI over shared memory only): gradient
averaging, SyncBatchNorm against one process, 2 ranks x 16 = 1 process x 32, bitwise
repeatable runs, signals and resume, dead and hung ranks, ranks that disagree."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cyconv
from cyconv import _norm, checkpoint, models, nn
from cyconv.data import ArrayDataset, Augment, DataLoader
from cyconv.distributed import (
    ShardedLoader,
    SyncBatchNorm,
    convert_sync_batchnorm,
    global_batch_ends,
)

from conftest import FD_TOL, assert_close, finite_difference

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).with_name("distributed_job.py")


def _mpirun():
    """(the mpirun command for 2 local ranks, None) or (None, why the tests are skipped)."""
    try:
        import mpi4py  # noqa: F401  (the module only: importing mpi4py.MPI would start MPI)
    except ImportError:
        return None, "mpi4py is not installed (pip install -e '.[mpi]')"
    launcher = shutil.which("mpirun") or str(Path(sys.executable).with_name("mpirun"))
    if not os.access(launcher, os.X_OK):
        return None, "mpirun is not installed (pip install -e '.[mpi]' brings Open MPI's)"
    # shared memory for MPI's messages; ranks that wait give their core away (this machine is
    # shared: a rank spinning 30 s for a hung one would take a core from everyone else)
    command = [launcher, "-n", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
               "self,sm", "--mca", "pml", "ob1", "--mca", "mpi_yield_when_idle", "1"]
    return command + (["--allow-run-as-root"] if os.geteuid() == 0 else []), None


MPIRUN, WHY_NOT = _mpirun()
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason=WHY_NOT or "")


def run_job(*args, ranks=True, timeout=240, check=True):
    command = (MPIRUN if ranks else []) + [sys.executable, str(JOB)] + [str(a) for a in args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if check and done.returncode:
        pytest.fail(f"{' '.join(command)} exited with {done.returncode}:\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


class OneRank:
    """The communicator of a run with one rank, for SyncBatchNorm in this process."""
    rank, size = 0, 1

    def dup(self):
        return self

    def gather(self, row, what, kind):
        return np.asarray(row, np.float64).reshape(1, -1)

    def sum_rows(self, row, what, kind):
        return np.asarray(row, np.float64)


# -- sharding ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, ranks", [(23, 4, 2), (16, 4, 2), (17, 4, 2), (9, 4, 2),
                                             (30, 3, 3), (31, 3, 3), (7, 1, 5), (5, 8, 3)])
def test_shards_cover_every_item_once(n, batch, ranks):
    data = ArrayDataset(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n) % 2, ["a", "b"])
    loaders = [ShardedLoader(data, batch, r, ranks, shuffle=True, seed=4, num_workers=0)
               for r in range(ranks)]
    assert len({len(loader) for loader in loaders}) == 1
    for epoch in range(3):
        parts = [loader._batches(epoch) for loader in loaders]
        seen = np.concatenate([index for rank in parts for index in rank])
        assert sorted(seen) == list(range(n))
        for step in zip(*parts):
            sizes = [len(part) for part in step]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sum(sizes) <= batch * ranks + ranks - 1


def test_drop_last_leaves_the_rest_out():
    assert global_batch_ends(23, 8, 2, drop_last=True) == [8, 16]
    assert global_batch_ends(23, 8, 2) == [8, 16, 23]
    assert global_batch_ends(17, 8, 2) == [8, 17]   # 1 item for 2 ranks: joins the last batch
    with pytest.raises(ValueError, match="3 items cannot be shared by 5 ranks"):
        global_batch_ends(3, 10, 5)
    with pytest.raises(ValueError, match="no batch of 8"):
        global_batch_ends(7, 8, 2, drop_last=True)


def test_rank_parts_are_the_halves_of_one_process_batches():
    """Same images, same augmentation: rank r's batch k is part r of one process's batch k."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (32, 12, 12, 3), np.uint8), np.arange(32) % 3,
                        ["a", "b", "c"])
    options = {"shuffle": True, "augment": Augment(), "seed": 9, "num_workers": 0}
    whole = list(DataLoader(data, 8, **options))
    parts = [list(ShardedLoader(data, 4, r, 2, **options)) for r in range(2)]
    for k, (x, y) in enumerate(whole):
        assert np.array_equal(np.concatenate([parts[0][k][0], parts[1][k][0]]), x)
        assert np.array_equal(np.concatenate([parts[0][k][1], parts[1][k][1]]), y)


def test_sharded_loader_checks_its_rank():
    data = ArrayDataset(np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, int), ["a"])
    with pytest.raises(ValueError, match="0 <= rank < ranks, got rank 2 of 2"):
        ShardedLoader(data, 1, 2, 2)


# -- SyncBatchNorm in one process: its kernels against BatchNorm2d -------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fuse", [False, True])
def test_sync_batchnorm_alone_is_batchnorm(dtype, fuse, rng, threads):
    """Odd sizes, two steps (running statistics with momentum None), a fused ReLU; and the
    same bits on 1, 2 and 3 threads."""
    x = (rng.standard_normal((3, 5, 7, 3)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight = rng.standard_normal(5)

    def run(sync, thread_count):
        threads(thread_count)
        bn = nn.BatchNorm2d(5, momentum=None, dtype=dtype)
        bn.weight.data[:] = weight
        layer = nn.Sequential(bn, nn.ReLU()) if fuse else nn.Sequential(bn)
        if sync:
            layer = convert_sync_batchnorm(layer, OneRank())
        outputs = []
        for _ in range(2):
            layer.zero_grad()
            outputs += [layer(x).copy(), layer.backward(dy).copy()]
        norm = layer[0]
        return outputs + [norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var]

    expected = run(False, 1)
    synced = [run(True, n) for n in (1, 2, 3)]
    for got, want in zip(synced[0], expected):
        assert_close(got, want.astype(np.float64))
    for other in synced[1:]:
        for a, b in zip(other, synced[0]):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sync_batchnorm_kernels_against_numpy(dtype, rng):
    """Odd sizes; the ReLU mask of a fused backward; dy and grad_input as one array."""
    x = (rng.standard_normal((3, 5, 7)) * 2 + 1).astype(dtype)
    weight, bias = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    mean, m2 = np.empty(5), np.empty(5)
    _norm.batch_norm2d_moments(x, mean, m2, 2)
    x64 = x.astype(np.float64)
    assert_close(mean, x64.mean(axis=(0, 2)), np.float64)
    assert_close(m2, ((x64 - x64.mean(axis=(0, 2))[:, None]) ** 2).sum(axis=(0, 2)), np.float64)
    invstd = 1 / np.sqrt(m2 / 21 + 1e-5)
    out = np.empty_like(x)
    _norm.batch_norm2d_normalize(x, weight, bias, mean, invstd, out, True, 2)
    normalized = (x64 - mean[:, None]) * invstd[:, None] * weight[:, None] + bias[:, None]
    assert_close(out, np.maximum(normalized, 0))
    dy, masked = rng.standard_normal(x.shape).astype(dtype), np.empty_like(x)
    sums, mean_here = np.empty((2, 5)), mean.astype(dtype)   # the layer keeps its dtype's mean
    _norm.batch_norm2d_backward_sums(dy, x, mean_here, out, masked, sums[0], sums[1], True, 2)
    expected_dy = np.where(out > 0, dy, 0).astype(np.float64)
    assert_close(masked, expected_dy)
    assert_close(sums[0], expected_dy.sum(axis=(0, 2)))
    assert_close(sums[1], (expected_dy * (x64 - mean_here[:, None])).sum(axis=(0, 2)))
    k, b, c0 = rng.standard_normal((3, 5))
    _norm.batch_norm2d_combine(masked, x, k, b, c0, masked, 2)
    assert_close(masked, k[:, None] * expected_dy + b[:, None] * x64 + c0[:, None])


def test_sync_batchnorm_alone_matches_finite_differences(rng):
    layer = convert_sync_batchnorm(nn.BatchNorm2d(3, dtype=np.float64), OneRank())
    layer.weight.data[:] = rng.standard_normal(3)
    x, weights = rng.standard_normal((3, 3, 2, 3)), rng.standard_normal((3, 3, 2, 3))
    layer(x)
    dx = layer.backward(weights)
    grads = [p.grad.copy() for p in layer.parameters()]
    np.testing.assert_allclose(dx, finite_difference(lambda v: (layer(v) * weights).sum(), x),
                               **FD_TOL)
    for p, grad in zip(layer.parameters(), grads):
        np.testing.assert_allclose(
            grad, finite_difference(lambda _: (layer(x) * weights).sum(), p.data), **FD_TOL)


def test_converted_model_keeps_keys_parameters_and_loads_as_batchnorm(tmp_path):
    cyconv.manual_seed(0)
    model = models.small(3, 16, widths=(4, 8))
    keys, params = list(model.state_dict()), model.parameters()
    spec = models.describe(model)
    converted = convert_sync_batchnorm(model, OneRank())
    assert converted is model and list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 2
    assert models.describe(model) == spec
    cyconv.save(model, tmp_path / "m.safetensors")
    loaded = cyconv.load(tmp_path / "m.safetensors")
    assert not any(isinstance(m, SyncBatchNorm) for m in loaded.modules())
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(loaded.eval()(x), model.eval()(x))


def test_a_converted_resnet_trains_as_the_plain_one():
    """SyncBatchNorm in a ResNet block runs its own forward (the block adds its paths
    after it): on one rank, a training step gives what BatchNorm2d gives."""
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    results = []
    for convert in (False, True):
        cyconv.manual_seed(4)
        model = models.resnet_small(3)
        if convert:
            convert_sync_batchnorm(model, OneRank())
        y = model(x)
        model.backward(np.ones_like(y))
        results.append([y] + [p.grad for p in model.parameters()])
    for synced, plain in zip(*results):
        np.testing.assert_allclose(synced, plain, rtol=1e-4, atol=1e-5)


# -- 2 ranks under mpirun ------------------------------------------------------------------

@needs_mpi
def test_shards_under_mpirun(tmp_path):
    run_job("shards", tmp_path / "shards.json")
    result = json.loads((tmp_path / "shards.json").read_text())
    assert result["steps"] == 3
    for epoch in range(3):
        parts = [result["ranks"][r][epoch] for r in range(2)]
        assert sorted(parts[0] + parts[1]) == list(range(23))


@needs_mpi
def test_gradients_are_the_batch_weighted_mean(tmp_path):
    run_job("average", tmp_path / "average.json")
    result = json.loads((tmp_path / "average.json").read_text())
    assert result["ranks_differed_before"] and result["ranks_equal"]
    assert result["max_error"] < 1e-6


@needs_mpi
def test_sync_batchnorm_matches_one_process(tmp_path):
    run_job("syncbn", tmp_path / "syncbn.npz")
    got = np.load(tmp_path / "syncbn.npz")
    for name, fuse in (("plain", False), ("relu", True)):
        bn = nn.BatchNorm2d(4, momentum=0.3, dtype=np.float64)
        bn.weight.data[:] = [1.5, -0.5, 2.0, 0.7]
        bn.bias.data[:] = [0.1, 0.2, -0.3, 0.0]
        model = nn.Sequential(bn, nn.ReLU()) if fuse else nn.Sequential(bn)
        for _ in range(2):
            model.zero_grad()
            y = model(got["x"])
            dx = model.backward(got["dy"])
        expected = {"y": y, "dx": dx, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
                        "running_mean": bn.running_mean, "running_var": bn.running_var}
        for key, value in expected.items():
            assert_close(got[f"{name}_{key}"], value, err_msg=f"{name} {key}")


def read_tensors(path):
    return checkpoint.read(path).tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two identical 2-rank runs (3 epochs of 10 steps) and one process at batch 32."""
    if MPIRUN is None:
        pytest.skip(WHY_NOT)
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        run_job("train", "--out", root / name, "--epochs", 3)
    run_job("train", "--out", root / "single", "--epochs", 3, "--batch", 32, ranks=False)
    return root


@needs_mpi
def test_two_ranks_train_as_one_process_and_repeat_bitwise(uninterrupted):
    runs = {name: read_tensors(uninterrupted / name / "last.safetensors")
            for name in ("a", "b", "single")}
    for key, value in runs["single"].items():
        assert runs["a"][key].tobytes() == runs["b"][key].tobytes(), key
        if value.dtype.kind == "f":
            error = np.abs(runs["a"][key] - value).max() / max(np.abs(value).max(), 1e-12)
            assert error <= 1e-5, (key, error)
    one, two = ([json.loads(line) for line in (uninterrupted / name / "history.jsonl")
                 .read_text().splitlines()] for name in ("single", "a"))
    for a, b in zip(one, two):
        for key in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    model = cyconv.load(uninterrupted / "a" / "best.safetensors")
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())


@needs_mpi
@pytest.mark.parametrize("name, target, finished", [("TERM", "launcher", 13),
                                                    ("INT", "launcher", 13),
                                                    ("TERM", "rank1", 14)])
def test_a_signal_saves_and_the_run_resumes_exactly(uninterrupted, tmp_path, name, target,
                                                    finished):
    """launcher: rank 0 signals mpirun (as kill or Ctrl-C would) as step 14 of 30 starts,
    then pauses 1 s after its forward; mpirun passes SIGTERM on 0.25 s later and kills the
    ranks 0.25 s after that, so the checkpoint is the one rank 0 wrote at once: 13 steps,
    the running statistics of step 14's forward undone.  rank1: rank 1 alone receives
    SIGTERM; the ranks finish step 14 and stop together, rank 0 saves.  Either run
    resumes to the same bits as the run never stopped."""
    out = tmp_path / "run"
    start = time.monotonic()
    done = run_job("train", "--out", out, "--epochs", 3, "--signal-at", 14, "--signal", name,
                   "--signal-to", target, "--pause", 1.0, check=False)
    assert done.returncode != 0 and time.monotonic() - start < 60
    saved = checkpoint.read(out / "last.safetensors").metadata["training_state"]
    assert saved["global_step"] == finished and saved["epoch"] == 1
    run_job("train", "--out", out, "--epochs", 3, "--resume")
    expected = read_tensors(uninterrupted / "a" / "last.safetensors")
    for key, value in read_tensors(out / "last.safetensors").items():
        assert value.tobytes() == expected[key].tobytes(), key


@needs_mpi
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_dead_rank_ends_the_job(tmp_path, how):
    """Rank 1 ends (os._exit(1), SIGKILL) at step 3: mpirun ends rank 0 at once, naming
    rank 1 in its words ("process rank 1", or "[<job>@1,1]" for an exit status); rank 0's
    watchdog, which sees rank 1's pid gone, would otherwise have."""
    start = time.monotonic()
    done = run_job("train", "--out", tmp_path, "--epochs", 50, "--die-at", 3, "--how", how,
                   check=False)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert re.search(r"rank 1\b|\[\S+@\d+,1\]", done.stdout + done.stderr)


@needs_mpi
@pytest.mark.parametrize("how, why", [("error", "has left the run"),
                                      ("stop", "sent no heartbeat")])
def test_rank_0_names_a_rank_that_left_or_hangs(tmp_path, how, why):
    """error: rank 1 ends with sys.exit, its MPI finalizing normally (it says goodbye)
    while rank 0 waits for it in a collective, and rank 0's watchdog ends the job 5 s
    later.  stop: rank 1 stops (SIGSTOP), which no launcher notices; rank 0's watchdog
    does after 10 s without a heartbeat (30 s by default)."""
    start = time.monotonic()
    done = run_job("train", "--out", tmp_path, "--epochs", 50, "--die-at", 3, "--how", how,
                   "--heartbeat-timeout", 10, check=False)
    assert done.returncode != 0 and time.monotonic() - start < 60
    assert "rank 1 (pid" in done.stderr and why in done.stderr


@needs_mpi
@pytest.mark.parametrize("fault, named", [("--seed-per-rank", "seed"),
                                          ("--data-per-rank", "data")])
def test_ranks_that_disagree_stop_at_start(tmp_path, fault, named):
    done = run_job("train", "--out", tmp_path, fault, check=False)
    assert done.returncode != 0
    assert "the ranks disagree on the data and settings" in done.stderr
    assert f"{named} (rank 1 differs from rank 0)" in done.stderr
    assert not (tmp_path / "last.safetensors").exists()
