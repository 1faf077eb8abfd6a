"""Batch norm, ReLU and a 2x2 max-pool with stride 2 (no padding) as one pass each way.

Layouts: x, grad_input (N, C, H, W); out, argmax, grad_out (N, C, OH, OW) with
OH = H // 2, OW = W // 2; argmax holds the flat index ih*W + iw of each window's
maximum inside its input plane, as MaxPool2d's does.  Each channel belongs to
one thread (prange over C), so results do not depend on the thread count.

Forward: the channel's statistics as BatchNorm2d's kernels take them (_norm.pxd),
then one sweep computes y = max(x * scale + shift, 0) and the window maxima.
Only the pooled output and its argmax are written: the same bits as the three
layers one after another, without the normalised array.

Backward: through the max-pool and the ReLU, the gradient reaching y is
grad_out[o] at argmax[o] when out[o] > 0 (that maximum passed the ReLU) and 0
everywhere else.  So batch norm's sums run over the pooled outputs, and its input
gradient is written in one sweep, without the full-size gradients of the
max-pool and the ReLU.  The sums take another order than the unfused layers'
(they skip the zeros), so the gradients agree with theirs to rounding.
"""
from cython cimport floating
from cython.parallel cimport prange

from cyconv._norm cimport batch_statistics, input_grad_coefficients, running_affine
from cyconv._parallel cimport chunk_size


# C kernels with a float and a double version, one name each (see _typed.h)
cdef extern from "_row_loops.h" nogil:
    # (const T* top, const T* bottom, T* out, int* where, n, int first, int W, T scale, T shift)
    void affine_relu_max_pool_2x2_row(...)
    # (const T* grad, const T* kept, const int* where, const T* x_top, const T* x_bottom,
    #  T* top, T* bottom, n, int first, int W, T k, T b, T c0)
    void batch_norm_max_pool_2x2_backward_row(...)
    # (const T* grad, const T* kept, const int* where, const T* plane, n, double center,
    #  double* sum_dy, double* sum_dy_x), adding to the sums: see _row_loops.h
    void pooled_gradient_sums(...)


def batch_norm2d_relu_max_pool_forward(
        const floating[:, :, :, ::1] x,   # IN    (N, C, H, W)
        const floating[::1] weight,       # IN    (C,)
        const floating[::1] bias,         # IN    (C,)
        floating[::1] running_mean,       # INOUT (C,) updated when batch_stats
        floating[::1] running_var,        # INOUT (C,) updated when batch_stats
        floating[::1] saved_mean,         # OUT   (C,) batch mean, when batch_stats
        floating[::1] saved_invstd,       # OUT   (C,) 1 / sqrt(var + eps), when batch_stats
        floating[:, :, :, ::1] out,       # OUT   (N, C, OH, OW)
        int[:, :, :, ::1] argmax,         # OUT   (N, C, OH, OW), or empty when not needed
        double eps, double momentum, bint batch_stats, int num_threads):
    """out = max-pool 2x2 of max(batch norm(x), 0).  batch_stats (train mode): normalise
    with the batch statistics and update the running ones; else with the running ones."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t chunk = chunk_size(C, OH * OW)
    cdef Py_ssize_t c, n, oh
    cdef bint store_argmax = argmax.shape[0] > 0
    cdef double mean, invstd, scale, shift
    cdef const floating* src
    cdef int* where
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            if batch_stats:
                mean, invstd = batch_statistics(&x[0, c, 0, 0], N, C * H * W, H * W, eps,
                                                momentum, True, &running_mean[c], &running_var[c])
                saved_mean[c] = <floating> mean
                saved_invstd[c] = <floating> invstd
                scale = weight[c] * invstd
                shift = bias[c] - mean * scale
            else:
                scale, shift = running_affine(weight[c], bias[c], running_mean[c],
                                              running_var[c], eps)
            for n in range(N):
                src = &x[n, c, 0, 0]
                where = &argmax[n, c, 0, 0] if store_argmax else NULL
                for oh in range(OH):
                    affine_relu_max_pool_2x2_row(
                        src + 2 * oh * W, src + (2 * oh + 1) * W, &out[n, c, oh, 0],
                        where + oh * OW if store_argmax else NULL, OW, <int> (2 * oh * W),
                        <int> W, <floating> scale, <floating> shift)


cdef inline void input_gradient_plane(const floating* grad, const floating* kept,
                                      const int* where, const floating* x, floating* dx,
                                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                                      floating k, floating b, floating c0) noexcept nogil:
    """dx = k dy + b x + c0 over one plane (dy as in pooled_gradient_sums); the row no
    window covers (odd H) has dy = 0."""
    cdef Py_ssize_t oh, i
    for oh in range(OH):
        batch_norm_max_pool_2x2_backward_row(
            grad + oh * OW, kept + oh * OW, where + oh * OW, x + 2 * oh * W,
            x + (2 * oh + 1) * W, dx + 2 * oh * W, dx + (2 * oh + 1) * W, OW,
            <int> (2 * oh * W), <int> W, k, b, c0)
    for i in range(2 * OH * W, H * W):
        dx[i] = k * 0 + b * x[i] + c0


def batch_norm2d_relu_max_pool_backward(
        const floating[:, :, :, ::1] grad_out,   # IN    (N, C, OH, OW)
        const floating[:, :, :, ::1] out,        # IN    (N, C, OH, OW) forward output
        const int[:, :, :, ::1] argmax,          # IN    (N, C, OH, OW)
        const floating[:, :, :, ::1] x,          # IN    (N, C, H, W) forward input
        const floating[::1] mean,                # IN    (C,) the statistics used forward
        const floating[::1] invstd,              # IN    (C,)
        const floating[::1] weight,              # IN    (C,)
        floating[::1] grad_weight,               # INOUT (C,), accumulated
        floating[::1] grad_bias,                 # INOUT (C,), accumulated
        floating[:, :, :, ::1] grad_input,       # OUT   (N, C, H, W)
        bint batch_stats, int num_threads):
    """Gradients of out = max-pool 2x2 of max((x - mean) * invstd * weight + bias, 0);
    batch_stats: mean and invstd were the batch's (they depend on x)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t chunk = chunk_size(C, OH * OW)
    cdef Py_ssize_t c, n
    cdef double sum_dy, sum_dy_xhat, k, b, c0
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            sum_dy = 0
            sum_dy_xhat = 0
            for n in range(N):
                pooled_gradient_sums(&grad_out[n, c, 0, 0], &out[n, c, 0, 0],
                                     &argmax[n, c, 0, 0], &x[n, c, 0, 0], OH * OW,
                                     <double> mean[c], &sum_dy, &sum_dy_xhat)
            sum_dy_xhat = sum_dy_xhat * invstd[c]
            grad_weight[c] += <floating> sum_dy_xhat
            grad_bias[c] += <floating> sum_dy
            k, b, c0 = input_grad_coefficients(weight[c], mean[c], invstd[c], sum_dy,
                                               sum_dy_xhat, <double> N * H * W, batch_stats)
            for n in range(N):
                input_gradient_plane(&grad_out[n, c, 0, 0], &out[n, c, 0, 0], &argmax[n, c, 0, 0],
                                     &x[n, c, 0, 0], &grad_input[n, c, 0, 0], H, W, OH, OW,
                                     <floating> k, <floating> b, <floating> c0)
