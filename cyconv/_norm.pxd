# The per-channel steps that every batch-norm kernel shares (_norm.pyx, and
# _norm_pool.pyx, which fuses a ReLU and a max-pool after the normalisation),
# written once so that the fused and the plain kernels give the same bits.
# A channel's planes are x + n * step, n < planes, each `length` long; sums run
# in double precision in a fixed order.
from cython cimport floating
from libc.math cimport sqrt

from cyconv._reduce cimport gradient_sums_run, sum_run, sum_squared_deviation


cdef inline (double, double) channel_moments(const floating* x, Py_ssize_t planes,
                                             Py_ssize_t step, Py_ssize_t length) noexcept nogil:
    """(mean, sum of squared deviations from it) over the channel's planes: two passes,
    so that the variance has no cancellation."""
    cdef double total = 0, mean
    cdef Py_ssize_t n
    for n in range(planes):
        total = total + sum_run(x + n * step, length)
    mean = total / (<double> planes * length)
    total = 0
    for n in range(planes):
        total = total + sum_squared_deviation(x + n * step, length, mean)
    return mean, total


cdef inline (double, double) batch_statistics(const floating* x, Py_ssize_t planes,
                                              Py_ssize_t step, Py_ssize_t length, double eps,
                                              double momentum, bint update_running,
                                              floating* running_mean,
                                              floating* running_var) noexcept nogil:
    """(mean, 1 / sqrt(var + eps)) of the channel's batch (biased var); when
    update_running, the running statistics (one channel's) move towards them by momentum
    (the variance unbiased)."""
    cdef double M = <double> planes * length
    cdef double mean, m2, var
    mean, m2 = channel_moments(x, planes, step, length)
    var = m2 / M
    if update_running:
        running_mean[0] = <floating> ((1 - momentum) * running_mean[0] + momentum * mean)
        running_var[0] = <floating> ((1 - momentum) * running_var[0]
                                     + momentum * var * M / max(M - 1, 1.0))
    return mean, 1.0 / sqrt(var + eps)


cdef inline (double, double) running_affine(double weight, double bias, double running_mean,
                                            double running_var, double eps) noexcept nogil:
    """(scale, shift) of the eval-mode map y = x * scale + shift."""
    cdef double scale = weight / sqrt(running_var + eps)
    return scale, bias - running_mean * scale


cdef inline (double, double) gradient_sums(const floating* grad_out, const floating* x,
                                           const floating* out, floating* masked,
                                           Py_ssize_t planes, Py_ssize_t step,
                                           Py_ssize_t length, double mean,
                                           int activation) noexcept nogil:
    """(sum dy, sum dy * (x - mean)) over the channel's planes: dy is grad_out, or with an
    activation (code of _elementwise.pxd) grad_out masked by its derivative read from
    out, written to masked (which may be grad_out's own gradient array); one sweep per
    plane."""
    cdef double total_dy = 0, total_dy_xmu = 0, plane_dy, plane_dy_xmu
    cdef Py_ssize_t n, at
    for n in range(planes):
        at = n * step
        gradient_sums_run(grad_out + at, out + at if activation else NULL, x + at,
                          masked + at if activation else NULL, length, mean, activation,
                          &plane_dy, &plane_dy_xmu)
        total_dy = total_dy + plane_dy
        total_dy_xmu = total_dy_xmu + plane_dy_xmu
    return total_dy, total_dy_xmu


cdef inline (double, double, double) input_grad_coefficients(
        double weight, double mean, double invstd, double sum_dy, double sum_dy_xhat,
        double M, bint batch_stats) noexcept nogil:
    """(k, b, c0) of dx = k dy + b x + c0, from the channel's sums of dy and dy * xhat.

    Train (batch_stats): dx = k (dy - sum_dy/M - xhat sum_dy_xhat/M), k = weight invstd,
    xhat = (x - mean) invstd; eval: the statistics are constants and dx = k dy.
    """
    cdef double k = weight * invstd, b
    if not batch_stats:
        return k, 0.0, 0.0
    b = -k * invstd * sum_dy_xhat / M
    return k, b, -k * sum_dy / M - b * mean
