"""Loading the compiled kernels with OpenMP settings of their own.

GNU OpenMP reads its settings once, from the environment, when the first library
that uses it is loaded.  Its default lets an idle thread spin for milliseconds,
burning the core that a data-loading thread or another process needs (measured:
training up to 30x slower next to another busy process); sleeping at once costs
a wake-up before every kernel (10-15% slower at batch 16 on 2 threads).  So the
kernels are loaded with a short spin (GOMP_SPINCOUNT=10000, a fraction of a
millisecond) and passive waiting, unless the user set those variables, and the
environment is put back as it was right after: child processes and os.environ
see nothing.  If another library loaded OpenMP first, its settings stand.
"""
import os

SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}



def _load_kernels():
    """cyconv._parallel (the first compiled module, so the one that loads OpenMP), loaded
    with cyconv's OpenMP settings; the environment is put back right after."""
    added = {name: value for name, value in SETTINGS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        from cyconv import _parallel
    finally:
        for name in added:
            os.environ.pop(name, None)
    return _parallel


parallel = _load_kernels()
