"""What the compiled kernels know about OpenMP."""


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (prange runs in parallel)."""
    return bool(CYCONV_OPENMP)
