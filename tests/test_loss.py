"""CrossEntropyLoss (mean reduction, optional label smoothing)."""
import numpy as np
import pytest

from cyconv import nn

import reference as R
from conftest import DTYPES, FD_TOL, assert_close, finite_difference, num_threads

CASES = [(1, 1), (1, 4), (3, 2), (8, 4), (5, 10), (16, 3), (2, 7)]
SMOOTHING = [0.0, 0.1, 0.35]


@pytest.mark.parametrize("ls", SMOOTHING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", CASES)
def test_forward_backward_matches_reference(N, C, dtype, ls, rng):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ls) if ls else nn.CrossEntropyLoss()
    z = (rng.standard_normal((N, C)) * 3).astype(dtype)
    labels = rng.integers(0, C, N)
    z0 = z.copy()
    loss = loss_fn(z, labels)
    assert type(loss) is float
    ref = R.cross_entropy_forward(z, labels, ls)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(loss - ref) <= tol * max(1.0, abs(ref))
    dz = loss_fn.backward()
    assert dz.shape == (N, C) and dz.dtype == dtype
    assert_close(dz, R.cross_entropy_backward(z, labels, ls), dtype)
    np.testing.assert_array_equal(z, z0)


@pytest.mark.parametrize("ls", SMOOTHING)
@pytest.mark.parametrize("N,C", [(1, 3), (4, 5), (3, 2)])
def test_finite_differences(N, C, ls, rng):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
    z = rng.standard_normal((N, C))
    labels = rng.integers(0, C, N)
    loss_fn(z, labels)
    dz = loss_fn.backward()
    num = finite_difference(lambda v: loss_fn(v, labels), z)
    np.testing.assert_allclose(dz, num, **FD_TOL)
    num_ref = finite_difference(lambda v: R.cross_entropy_forward(v, labels, ls), z)
    np.testing.assert_allclose(R.cross_entropy_backward(z, labels, ls), num_ref, **FD_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numerically_stable_for_large_logits(dtype):
    z = np.array([[1000.0, 0.0, -1000.0], [-500.0, 500.0, 499.0]], dtype=dtype)
    labels = np.array([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(z, labels)
    ref = R.cross_entropy_forward(z, labels)
    assert np.isfinite(loss)
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    dz = loss_fn.backward()
    assert np.all(np.isfinite(dz))
    assert_close(dz, R.cross_entropy_backward(z, labels), dtype)


def test_known_values():
    loss_fn = nn.CrossEntropyLoss()
    z = np.zeros((2, 4))
    assert abs(loss_fn(z, np.array([1, 3])) - np.log(4)) < 1e-12
    np.testing.assert_allclose(loss_fn.backward(),
                               [[0.125, -0.375, 0.125, 0.125], [0.125, 0.125, 0.125, -0.375]])
    # label smoothing moves eps/C of the target mass to every class
    ls = nn.CrossEntropyLoss(label_smoothing=0.2)
    z = np.array([[2.0, 0.0]])
    lp = R.log_softmax(z)[0]
    expected = -(0.9 * lp[0] + 0.1 * lp[1])
    assert abs(ls(z, np.array([0])) - expected) < 1e-12


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.intp, np.uint8])
def test_integer_label_dtypes_accepted(label_dtype, rng):
    z = rng.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2], dtype=label_dtype)
    loss = nn.CrossEntropyLoss()(z, labels)
    assert abs(loss - R.cross_entropy_forward(z, labels.astype(np.int64))) < 1e-12


def test_backward_reflects_last_call(rng):
    loss_fn = nn.CrossEntropyLoss()
    z1, z2 = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    l1 = np.array([0, 1, 2])
    l2 = np.array([3, 3])
    loss_fn(z1, l1)
    loss_fn(z2, l2)
    np.testing.assert_allclose(loss_fn.backward(), R.cross_entropy_backward(z2, l2),
                               rtol=1e-12, atol=1e-15)


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    for ls in SMOOTHING:
        z = rng.standard_normal((6, 5)) * 2
        labels = rng.integers(0, 5, 6)
        tz = torch.from_numpy(z.copy()).requires_grad_(True)
        tl = torch.nn.CrossEntropyLoss(label_smoothing=ls)(tz, torch.from_numpy(labels))
        tl.backward()
        loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
        assert abs(loss_fn(z, labels) - tl.item()) < 1e-12
        np.testing.assert_allclose(loss_fn.backward(), tz.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_ruled_out_class_matches_pytorch(smoothing, dtype):
    """A non-target logit of -inf: finite loss without smoothing (PyTorch 0.4741 here),
    +inf with it (the smoothed target puts mass on that class), finite gradients."""
    torch = pytest.importorskip("torch")
    logits = np.array([[1.0, -np.inf, 0.5], [0.2, 0.1, -0.3]], dtype)
    labels = np.array([0, 2])
    loss_fn = nn.CrossEntropyLoss(smoothing)
    loss = loss_fn(logits, labels)
    grad = loss_fn.backward()
    t = torch.from_numpy(logits.copy()).requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(t, torch.from_numpy(labels),
                                                 label_smoothing=smoothing)
    expected.backward()
    if smoothing:
        assert loss == np.inf and expected.item() == np.inf
    else:
        assert np.isfinite(loss) and loss == pytest.approx(expected.item(), rel=1e-5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)


# --- class probabilities as the target (mixed images) ------------------------

def probabilities(rng, N, C, dtype):
    """Random rows summing to 1, some of them one-hot, some with zeros."""
    q = rng.random((N, C)) * (rng.random((N, C)) < 0.6)
    q[np.arange(N), rng.integers(0, C, N)] += 1
    return (q / q.sum(axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("ls", SMOOTHING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", CASES)
def test_probabilities_match_reference(N, C, dtype, ls, rng):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
    z = (rng.standard_normal((N, C)) * 3).astype(dtype)
    q = probabilities(rng, N, C, dtype)
    z0, q0 = z.copy(), q.copy()
    loss = loss_fn(z, q)
    ref = R.cross_entropy_forward(z, q, ls)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert type(loss) is float and abs(loss - ref) <= tol * max(1.0, abs(ref))
    dz = loss_fn.backward()
    assert dz.shape == (N, C) and dz.dtype == dtype
    assert_close(dz, R.cross_entropy_backward(z, q, ls), dtype)
    np.testing.assert_array_equal(z, z0)
    np.testing.assert_array_equal(q, q0)


@pytest.mark.parametrize("ls", SMOOTHING)
@pytest.mark.parametrize("N,C", [(1, 3), (4, 5), (3, 2)])
def test_probabilities_finite_differences(N, C, ls, rng):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
    z, q = rng.standard_normal((N, C)), probabilities(rng, N, C, np.float64)
    loss_fn(z, q)
    num = finite_difference(lambda v: loss_fn(v, q), z)
    np.testing.assert_allclose(loss_fn.backward(), num, **FD_TOL)


@pytest.mark.parametrize("ls", SMOOTHING)
def test_one_hot_probabilities_equal_labels(ls, rng):
    z = rng.standard_normal((9, 4))
    labels = rng.integers(0, 4, 9)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
    by_label, grad_by_label = loss_fn(z, labels), loss_fn.backward()
    by_probability = loss_fn(z, np.eye(4)[labels])
    assert by_probability == pytest.approx(by_label, rel=1e-14)
    np.testing.assert_allclose(loss_fn.backward(), grad_by_label, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probabilities_do_not_depend_on_the_threads(dtype, rng):
    z = rng.standard_normal((20001, 5)).astype(dtype)
    q = probabilities(rng, 20001, 5, dtype)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            loss_fn = nn.CrossEntropyLoss(0.1)
            results.append((loss_fn(z, q), loss_fn.backward()))
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


def test_probabilities_match_torch(rng):
    torch = pytest.importorskip("torch")
    for ls in SMOOTHING:
        z, q = rng.standard_normal((6, 5)) * 2, probabilities(rng, 6, 5, np.float64)
        tz = torch.from_numpy(z.copy()).requires_grad_(True)
        expected = torch.nn.CrossEntropyLoss(label_smoothing=ls)(tz, torch.from_numpy(q))
        expected.backward()
        loss_fn = nn.CrossEntropyLoss(label_smoothing=ls)
        assert loss_fn(z, q) == pytest.approx(expected.item(), rel=1e-12)
        np.testing.assert_allclose(loss_fn.backward(), tz.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_a_ruled_out_class_with_no_probability_keeps_the_loss_finite():
    z = np.array([[1.0, -np.inf, 0.5]])
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(z, np.array([[0.25, 0.0, 0.75]]))
    lp = np.array([1.0, 0.5]) - np.logaddexp(1.0, 0.5)
    assert loss == pytest.approx(-(0.25 * lp[0] + 0.75 * lp[1]), rel=1e-12)
    assert np.all(np.isfinite(loss_fn.backward()))


@pytest.mark.parametrize("target,error,match", [
    (np.full((2, 3), 1 / 3, np.float32), TypeError, "logits' dtype float64, got float32"),
    (np.full((2, 4), 0.25), ValueError, r"logits' shape \(2, 3\), got \(2, 4\)"),
    (np.array([[0.5, 0.7, -0.2], [1, 0, 0]]), ValueError, r"in \[0, 1\], got -0.2 at row 0"),
    (np.array([[1, 0, 0], [np.nan, 0.5, 0.5]]), ValueError, r"got nan at row 1, class 0"),
    (np.array([[1, 0, 0], [0.5, 0.2, 0.2]]), ValueError, "sum to 1, got 0.9 in row 1"),
    (np.array([0.5, 1.5]), TypeError, r"integer labels \(N,\) or class probabilities"),
])
def test_bad_probabilities_are_refused(target, error, match):
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(error, match=match):
        loss_fn(np.zeros((2, 3)), target)
