# Sums over contiguous runs, in double precision, with 8 independent
# accumulators: a single running sum is one long chain of dependent additions
# (latency-bound, ~4 cycles each); eight chains overlap.  The order of the
# additions is fixed by the length alone, so results never depend on threads.
from cython cimport floating


cdef inline double sum_run(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum_i x[i]"""
    cdef double acc[8]
    cdef Py_ssize_t i, j
    for j in range(8):
        acc[j] = 0
    for i in range(0, n - 7, 8):
        for j in range(8):
            acc[j] += x[i + j]
    for i in range(n - n % 8, n):
        acc[0] += x[i]
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double sum_squared_deviation(const floating* x, Py_ssize_t n,
                                         double center) noexcept nogil:
    """sum_i (x[i] - center)^2"""
    cdef double acc[8]
    cdef double d
    cdef Py_ssize_t i, j
    for j in range(8):
        acc[j] = 0
    for i in range(0, n - 7, 8):
        for j in range(8):
            d = x[i + j] - center
            acc[j] += d * d
    for i in range(n - n % 8, n):
        d = x[i] - center
        acc[0] += d * d
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double sum_product_centered(const floating* a, const floating* x, Py_ssize_t n,
                                        double center) noexcept nogil:
    """sum_i a[i] * (x[i] - center)"""
    cdef double acc[8]
    cdef Py_ssize_t i, j
    for j in range(8):
        acc[j] = 0
    for i in range(0, n - 7, 8):
        for j in range(8):
            acc[j] += a[i + j] * (x[i + j] - center)
    for i in range(n - n % 8, n):
        acc[0] += a[i] * (x[i] - center)
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
