# Sums over contiguous runs, in double precision, in an order fixed by the run's
# length alone, so that results never depend on the thread count (C: _runs.h).

# float and double versions, one name (see _typed.h)
cdef extern from "_runs.h" nogil:
    double sum_run(...)                # (const T* x, n): sum_i x[i]
    double sum_squared_deviation(...)  # (const T* x, n, double center): sum_i (x[i] - center)^2
    # (const T* grad, const T* out, const T* x, T* masked, n, double center, int activation,
    # double* sum_m, double* sum_mx): the sums of m and m * (x - center), m = grad masked
    # by the derivative of the activation (ReLU: 1, ReLU6: 2) read from out, stored in
    # masked; with activation 0, m = grad and out and masked are not read
    void gradient_sums_run(...)
