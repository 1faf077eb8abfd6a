"""What the compiled kernels know about OpenMP."""


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (prange runs in parallel)."""
    return bool(CYCONV_OPENMP)


def openmp_max_threads():
    """OpenMP's default team size (1 in a serial build)."""
    return omp_get_max_threads()
