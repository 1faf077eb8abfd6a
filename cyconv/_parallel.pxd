cdef extern from "_openmp_helpers.h":
    int CYCONV_OPENMP


# Threads take channels or planes in chunks of consecutive ones that span about
# TASK_ELEMENTS elements (per image): dealt out one at a time, neighbouring small
# planes went to the threads in turn, and both wrote the cache lines those planes
# share at their ends (numpy's arrays are 16-byte aligned; batch norm at 7x7 ran
# slower on 2 threads than on 1).  At least 8 chunks, for the balance of dynamic
# schedules.  The split never changes what a channel or plane computes.
cdef enum:
    TASK_ELEMENTS = 1024


cdef inline Py_ssize_t chunk_size(Py_ssize_t count, Py_ssize_t plane_size) noexcept nogil:
    """Channels (or planes) per chunk, of count in all, each plane_size elements per image."""
    cdef Py_ssize_t by_size = TASK_ELEMENTS // plane_size if plane_size > 0 else count
    return max(1, min(by_size, count // 8))
