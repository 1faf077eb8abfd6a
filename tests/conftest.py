"""Shared fixtures and helpers for the cyconv test suite.

Helpers are plain functions (importable with ``from conftest import ...``,
pytest puts this directory on sys.path) and are also exposed as fixtures.
"""
import contextlib
import importlib.util
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

try:  # the reference tests must still run when cyconv does not import
    import cyconv
except ImportError:  # pragma: no cover
    # plain `pytest` from the repository does not put the repository root on
    # sys.path; an in-place build (setup.py build_ext --inplace) lives there
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import cyconv
    except ImportError:
        cyconv = None

TOL = {
    np.float32: dict(rtol=1e-4, atol=1e-5),
    np.float64: dict(rtol=1e-10, atol=1e-10),
}
FD_TOL = dict(rtol=1e-5, atol=1e-7)
DTYPES = [np.float32, np.float64]


def assert_close(actual, expected, dtype=None, scale=None, err_msg=""):
    """Compare ``actual`` (computed in ``dtype``) with a float64 reference.

    The absolute tolerance is scaled by the magnitude of the reference so
    that sums of many terms are judged relative to their size.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    dtype = np.dtype(actual.dtype if dtype is None else dtype).type
    tol = TOL[dtype]
    if scale is None:
        scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected,
                               rtol=tol["rtol"], atol=tol["atol"] * scale,
                               err_msg=err_msg)


def finite_difference(f, x, eps=1e-6):
    """Central-difference gradient of the scalar ``f(x)`` with respect to ``x``.

    ``x`` is perturbed IN PLACE, one element at a time, and restored, so it
    may be a parameter array that ``f`` reads indirectly (``f`` is still
    called with ``x`` as its argument).
    """
    assert x.dtype == np.float64
    grad = np.zeros(x.shape)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        fp = float(f(x))
        x[idx] = old - eps
        fm = float(f(x))
        x[idx] = old
        grad[idx] = (fp - fm) / (2 * eps)
    return grad


def distinct(rng, shape, dtype=np.float64, low=0.05, spread=3.0):
    """Random array whose entries are pairwise distinct (gaps >= spread/size)
    and whose magnitudes are >= ``low`` (so no entry sits on a ReLU or max
    pool kink at finite-difference resolution)."""
    n = int(np.prod(shape))
    mags = low + spread * (rng.permutation(n) + 1) / n
    signs = rng.choice([-1.0, 1.0], size=n)
    return (mags * signs).reshape(shape).astype(dtype)


def shape_regex(shape):
    """Regex matching a shape written in any common style:
    '(2, 3, 4)', '[2, 3, 4]', '2x3x4'."""
    return r"\D+".join(str(int(s)) for s in shape)


def assert_msg_mentions(excinfo, *items):
    """The exception message contains every item (str -> regex, tuple -> shape)."""
    msg = str(excinfo.value)
    for item in items:
        pat = shape_regex(item) if isinstance(item, tuple) else str(item)
        assert re.search(pat, msg), f"message {msg!r} does not mention {item!r}"


@contextlib.contextmanager
def num_threads(n):
    """Context manager: run the body with ``cyconv.set_num_threads(n)``."""
    old = cyconv.get_num_threads()
    cyconv.set_num_threads(n)
    try:
        yield
    finally:
        cyconv.set_num_threads(old)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def call_example(capsys, script, *args):
    """Run an example's main() in this process, as its command line would (faster than a
    subprocess): (exit status, stdout, stderr)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}",
                                                      EXAMPLES / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        capsys.readouterr()
        try:
            module.run(lambda: module.main([str(a) for a in args]))
        except SystemExit as exit:
            code = exit.code
    finally:
        sys.path.remove(str(EXAMPLES))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name (reproducible per test)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def threads():
    """Fixture returning a setter ``threads(n)``; the original thread count is
    restored when the test ends."""
    old = cyconv.get_num_threads()
    yield cyconv.set_num_threads
    cyconv.set_num_threads(old)


@pytest.fixture(name="finite_difference")
def _finite_difference_fixture():
    return finite_difference


def random_projection_loss(layer, x, R):
    """Closure f(_) = sum(layer(x) * R), evaluated in float64."""
    def f(_):
        return float((np.asarray(layer(x), dtype=np.float64) * R).sum())
    return f


@pytest.fixture(autouse=True)
def parallel_even_for_small_work(monkeypatch):
    """Test shapes are tiny; without this, kernels would run them on one thread only
    (cyconv._threads.threads_for) and the parallel paths would go untested."""
    import cyconv._threads
    monkeypatch.setattr(cyconv._threads, "MIN_PARALLEL_WORK", 0)
