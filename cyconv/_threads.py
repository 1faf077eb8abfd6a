"""How many threads the kernels use, and their OpenMP and BLAS settings.

The kernels parallelise with OpenMP (prange) and call BLAS from inside their
parallel loops, one matrix product per thread, so the BLAS that those calls reach
(scipy's) must run single-threaded while they do: ``blas_single_threaded()`` holds
it at one thread for the duration of a kernel call and restores it afterwards.
Importing cyconv changes neither ``os.environ`` nor any thread count.
"""
import os
import threading

from cyconv._environment import parallel as _parallel

# At most this many threads per core: more only adds waiting (and memory: the
# kernels keep a workspace per thread).
THREADS_PER_CORE = 4


def available_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def max_num_threads():
    """The most threads set_num_threads accepts: 4 per core this process may use."""
    return THREADS_PER_CORE * available_cores()


def _default_num_threads():
    """OMP_NUM_THREADS when it is a usable number, else the available cores."""
    from_env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if from_env.isdigit() and 1 <= int(from_env) <= max_num_threads():
        return int(from_env)
    return available_cores()


_num_threads = _default_num_threads() if _parallel.openmp_enabled() else 1


def get_num_threads():
    """The number of threads the kernels use (1 in a build without OpenMP)."""
    return _num_threads


def set_num_threads(n):
    """Use n threads in the kernels (1 to 4 per available core).  Results do not depend on n."""
    import numpy as np
    global _num_threads
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) \
            or not 1 <= n <= max_num_threads():
        raise ValueError(f"set_num_threads: expected an int from 1 to {max_num_threads()} "
                         f"({THREADS_PER_CORE} per core, {available_cores()} cores here), "
                         f"got {n!r}")
    _num_threads = int(n) if _parallel.openmp_enabled() else 1


# Below this many elements of work a kernel runs on the calling thread alone:
# waking a sleeping thread (tens to hundreds of microseconds on a virtual
# machine) costs more than the second thread saves.  Results are the same.
MIN_PARALLEL_WORK = 1 << 15


def threads_for(work):
    """The threads for a kernel call over `work` elements: 1 for small work."""
    return 1 if work < MIN_PARALLEL_WORK else _num_threads


class _KernelBlas:
    """scipy's BLAS (the one the kernels call), found on first use, and a count of the
    kernel calls that hold it at one thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.libraries = None
        self.holders = 0
        self.saved = []

    def find(self):
        """The BLAS libraries the kernels' calls reach: scipy's own OpenBLAS when its
        wheel ships one (under scipy.libs), else every BLAS in the process (a system
        scipy shares numpy's)."""
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS the kernels call)
        from threadpoolctl import ThreadpoolController
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        return [lib for lib in blas if "scipy.libs" in lib.filepath] or blas

    def __enter__(self):
        with self.lock:
            if self.libraries is None:
                self.libraries = self.find()
            if self.holders == 0:
                self.saved = [lib.get_num_threads() for lib in self.libraries]
                for lib, count in zip(self.libraries, self.saved):
                    if count != 1:
                        lib.set_num_threads(1)
            self.holders += 1

    def __exit__(self, *exc_info):
        with self.lock:
            self.holders -= 1
            if self.holders == 0:
                for lib, count in zip(self.libraries, self.saved):
                    if count != 1:
                        lib.set_num_threads(count)
        return False


_kernel_blas = _KernelBlas()


def blas_single_threaded():
    """Context: the kernels' BLAS runs on one thread inside (kernel calls that use BLAS)."""
    return _kernel_blas
