# Sums over contiguous runs, in double precision, in an order fixed by the run's
# length alone, so that results never depend on the thread count (C: _runs.h).

# float and double versions, one name (see _typed.h)
cdef extern from "_runs.h" nogil:
    double sum_run(...)                # (const T* x, n): sum_i x[i]
    double sum_squared_deviation(...)  # (const T* x, n, double center): sum_i (x[i] - center)^2
    double sum_product_centered(...)   # (const T* a, const T* x, n, double center):
    #                                    sum_i a[i] * (x[i] - center)
