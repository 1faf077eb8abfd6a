"""How many threads the kernels use.

cyconv's kernels parallelise with OpenMP (prange) and call BLAS from inside
their parallel loops, one matrix product per thread; the BLAS that scipy ships
(the one those calls reach) is therefore held at one thread, so that threads
are never nested.  ``set_num_threads`` sets the kernels' team size and also
limits numpy's BLAS, so that user code around cyconv obeys the same number.
"""
import os

from threadpoolctl import ThreadpoolController

from cyconv._parallel import openmp_enabled


def _default_num_threads():
    """The cores this process may run on (or OMP_NUM_THREADS when set)."""
    from_env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _blas_libraries():
    """(the BLAS the kernels call, the other BLAS libraries) loaded in this process.

    scipy's wheels ship their own OpenBLAS under scipy.libs; when that is not
    found (a system scipy sharing numpy's BLAS) every BLAS counts as the kernels'.
    """
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS the kernels call)
    blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    kernels_blas = [lib for lib in blas if "scipy.libs" in lib.filepath] or blas
    return kernels_blas, [lib for lib in blas if lib not in kernels_blas]


_SCIPY_BLAS, _OTHER_BLAS = _blas_libraries()
for _lib in _SCIPY_BLAS:
    _lib.set_num_threads(1)

_num_threads = _default_num_threads() if openmp_enabled() else 1


def get_num_threads():
    """The number of threads the kernels use (1 in a build without OpenMP)."""
    return _num_threads


def set_num_threads(n):
    """Use n threads in the kernels and in numpy's BLAS.  Results do not depend on n."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected a positive int number of threads, got {n!r}")
    _num_threads = n if openmp_enabled() else 1
    for lib in _OTHER_BLAS:
        lib.set_num_threads(n)


# Below this many elements of work a kernel runs on the calling thread alone:
# waking a sleeping thread (tens to hundreds of microseconds on a virtual
# machine) costs more than the second thread saves.  Results are the same.
MIN_PARALLEL_WORK = 1 << 15


def threads_for(work):
    """The threads for a kernel call over `work` elements: 1 for small work."""
    return 1 if work < MIN_PARALLEL_WORK else _num_threads
