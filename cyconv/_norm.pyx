"""2-D batch normalisation kernels (per channel over N, H, W).

Layouts: x, out, grad (N, C, HW) (the NCHW batch with H*W flattened);
per-channel vectors (C,).  Each channel belongs to one thread (prange over C)
and its sums run in a fixed order in double precision, so results do not
depend on the thread count.

    train:  mean_c = sum x / M,  var_c = sum (x - mean_c)^2 / M,  M = N*H*W
            y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
            running_mean = (1 - momentum) running_mean + momentum mean_c
            running_var  = (1 - momentum) running_var  + momentum var_c * M / (M - 1)
    eval:   the running statistics stand for mean_c and var_c.

An activation (ReLU or ReLU6: the codes of _elementwise.pxd, 0 for none) may follow
in the same pass, its gradient masked from the output in backward.  The forwards may
also add an array to y before the activation (a residual connection's other path).
"""
from cython cimport floating
from cython.parallel cimport prange

from cyconv._parallel cimport chunk_size


# float and double versions, one name (see _typed.h), in C: _runs.h
cdef extern from "_runs.h" nogil:
    # (const T* x, T* out, n, T scale, T shift, int activation):
    # out = x * scale + shift, then the activation (RELU, RELU6 or none; NaN kept)
    void affine_run(...)
    # (const T* x, const T* addend, T* out, n, T scale, T shift, int activation):
    # out = (x * scale + shift) + addend, then the activation
    void affine_add_run(...)
    # (const T* dy, const T* x, T* out, n, T a, T b, T c): out = a * dy + b * x + c
    void combine_run(...)


cdef inline void normalize_channel(const floating[:, :, ::1] x, const floating[:, :, ::1] addend,
                                   floating[:, :, ::1] out, Py_ssize_t c, double scale,
                                   double shift, int activation) noexcept nogil:
    """out[:, c] = x[:, c] * scale + shift (+ addend[:, c] unless addend is empty), then the
    activation, scale and shift rounded to the array's precision."""
    cdef Py_ssize_t n
    for n in range(x.shape[0]):
        if addend.shape[0] > 0:
            affine_add_run(&x[n, c, 0], &addend[n, c, 0], &out[n, c, 0], x.shape[2],
                           <floating> scale, <floating> shift, activation)
        else:
            affine_run(&x[n, c, 0], &out[n, c, 0], x.shape[2], <floating> scale,
                       <floating> shift, activation)


def batch_norm2d_forward_train(const floating[:, :, ::1] x,      # IN    (N, C, HW)
                               const floating[::1] weight,       # IN    (C,)
                               const floating[::1] bias,         # IN    (C,)
                               floating[::1] running_mean,       # INOUT (C,)
                               floating[::1] running_var,        # INOUT (C,)
                               floating[::1] saved_mean,         # OUT   (C,) batch mean
                               floating[::1] saved_invstd,       # OUT   (C,) 1 / sqrt(var + eps)
                               const floating[:, :, ::1] addend, # IN    (N, C, HW), or empty
                               floating[:, :, ::1] out,          # OUT   (N, C, HW)
                               double eps, double momentum, bint update_running,
                               int activation, int num_threads):
    """Normalise with the batch statistics (plus addend, then the activation); update the
    running ones."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c
    cdef double mean, invstd, scale, shift
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            mean, invstd = batch_statistics(&x[0, c, 0], N, C * HW, HW, eps, momentum,
                                            update_running, &running_mean[c], &running_var[c])
            saved_mean[c] = <floating> mean
            saved_invstd[c] = <floating> invstd
            scale = weight[c] * invstd
            shift = bias[c] - mean * scale
            normalize_channel(x, addend, out, c, scale, shift, activation)


def batch_norm2d_forward_eval(const floating[:, :, ::1] x,        # IN  (N, C, HW)
                              const floating[::1] weight,         # IN  (C,)
                              const floating[::1] bias,           # IN  (C,)
                              const floating[::1] running_mean,   # IN  (C,)
                              const floating[::1] running_var,    # IN  (C,)
                              const floating[:, :, ::1] addend,   # IN  (N, C, HW), or empty
                              floating[:, :, ::1] out,            # OUT (N, C, HW)
                              double eps, int activation, int num_threads):
    """Normalise with the running statistics (an affine map per channel; plus addend,
    then the activation)."""
    cdef Py_ssize_t C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c
    cdef double scale, shift
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            scale, shift = running_affine(weight[c], bias[c], running_mean[c], running_var[c], eps)
            normalize_channel(x, addend, out, c, scale, shift, activation)


def batch_norm2d_fold_weight(const floating[:, ::1] weight,   # IN  (OC, K) a convolution's
                             const double[::1] scale,           # IN  (OC,) weight / sqrt(var + eps)
                             floating[:, ::1] out,              # OUT (OC, K)
                             int num_threads):
    """out = weight * scale per row, each product in double, then rounded to the dtype:
    the weight of a convolution with this layer folded into it (eval mode)."""
    cdef Py_ssize_t OC = weight.shape[0], K = weight.shape[1]
    cdef Py_ssize_t o, k
    cdef double s
    with nogil:
        for o in prange(OC, schedule='static', num_threads=num_threads):
            s = scale[o]
            for k in range(K):
                out[o, k] = <floating> (weight[o, k] * s)


def batch_norm2d_backward(const floating[:, :, ::1] grad_out,   # IN    (N, C, HW)
                          const floating[:, :, ::1] x,          # IN    (N, C, HW) forward input
                          const floating[::1] mean,             # IN    (C,) the statistics used forward
                          const floating[::1] invstd,           # IN    (C,)
                          const floating[::1] weight,           # IN    (C,)
                          floating[::1] grad_weight,            # INOUT (C,), accumulated
                          floating[::1] grad_bias,              # INOUT (C,), accumulated
                          const floating[:, :, ::1] out,        # IN    (N, C, HW) forward output, with an activation
                          floating[:, :, ::1] grad_input,       # OUT   (N, C, HW)
                          bint batch_stats, int activation, int num_threads):
    """Gradients of y = (x - mean) * invstd * weight + bias.

    batch_stats (train mode): mean and invstd depend on x, so
        dx = weight * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M);
    otherwise (eval mode) they are constants and dx = weight * invstd * dy.
    activation: the forward also applied it, so dy is first masked by its derivative
    read from out (into grad_input, which then serves as dy in place).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c, n
    cdef double M = <double> N * HW
    cdef double sum_dy, sum_dy_xhat, k, b, c0, mu, istd
    cdef const floating* dy
    if N == 0:  # (eval mode) nothing to add, and no plane to point at
        return
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            mu = mean[c]
            istd = invstd[c]
            sum_dy, sum_dy_xhat = gradient_sums(&grad_out[0, c, 0], &x[0, c, 0], &out[0, c, 0]
                                                if activation else NULL,
                                                &grad_input[0, c, 0], N, C * HW, HW, mu,
                                                activation)
            sum_dy_xhat = sum_dy_xhat * istd
            grad_weight[c] += <floating> sum_dy_xhat
            grad_bias[c] += <floating> sum_dy
            k, b, c0 = input_grad_coefficients(weight[c], mu, istd, sum_dy, sum_dy_xhat, M,
                                               batch_stats)
            for n in range(N):
                dy = &grad_out[n, c, 0]
                if activation:  # the masked gradient is in grad_input
                    dy = &grad_input[n, c, 0]
                combine_run(dy, &x[n, c, 0], &grad_input[n, c, 0], HW,
                            <floating> k, <floating> b, <floating> c0)


# Synchronised batch normalisation (cyconv.distributed.SyncBatchNorm): the batch
# statistics and the sums of the input gradient are combined across processes in
# Python between these kernels, so each one covers this process's part of the
# batch only; per-channel results are double precision.

def batch_norm2d_moments(const floating[:, :, ::1] x,   # IN  (N, C, HW)
                         double[::1] mean,              # OUT (C,) sum x / M,  M = N*HW
                         double[::1] m2,                # OUT (C,) sum (x - mean)^2
                         int num_threads):
    """Per-channel mean and sum of squared deviations (two passes, as the train kernel)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c
    cdef double mu, deviations
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            mu, deviations = channel_moments(&x[0, c, 0], N, C * HW, HW)
            mean[c] = mu
            m2[c] = deviations


def batch_norm2d_normalize(const floating[:, :, ::1] x,    # IN  (N, C, HW)
                           const floating[::1] weight,     # IN  (C,)
                           const floating[::1] bias,       # IN  (C,)
                           const double[::1] mean,         # IN  (C,)
                           const double[::1] invstd,       # IN  (C,) 1 / sqrt(var + eps)
                           floating[:, :, ::1] out,        # OUT (N, C, HW)
                           int activation, int num_threads):
    """out = (x - mean) * invstd * weight + bias (then the activation)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c, n
    cdef double scale, shift
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            scale = weight[c] * invstd[c]
            shift = bias[c] - mean[c] * scale
            for n in range(N):
                affine_run(&x[n, c, 0], &out[n, c, 0], HW, <floating> scale, <floating> shift,
                           activation)


def batch_norm2d_backward_sums(const floating[:, :, ::1] grad_out,   # IN  (N, C, HW)
                               const floating[:, :, ::1] x,          # IN  (N, C, HW)
                               const floating[::1] mean,             # IN  (C,)
                               const floating[:, :, ::1] out,        # IN  (N, C, HW) forward output, with an activation
                               floating[:, :, ::1] masked,           # OUT (N, C, HW) masked grad_out, with an activation
                               double[::1] sum_dy,                   # OUT (C,) sum dy
                               double[::1] sum_dy_xmu,               # OUT (C,) sum dy * (x - mean)
                               int activation, int num_threads):
    """The per-channel sums that the input gradient needs; dy is grad_out, or with an
    activation grad_out masked by its derivative (written to masked)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c
    cdef double total_dy, total_dy_xmu
    if N == 0:  # no plane to point at: the sums are 0
        sum_dy[:] = 0
        sum_dy_xmu[:] = 0
        return
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            total_dy, total_dy_xmu = gradient_sums(&grad_out[0, c, 0], &x[0, c, 0],
                                                   &out[0, c, 0] if activation else NULL,
                                                   &masked[0, c, 0] if activation else NULL,
                                                   N, C * HW, HW, mean[c], activation)
            sum_dy[c] = total_dy
            sum_dy_xmu[c] = total_dy_xmu


def batch_norm2d_combine(const floating[:, :, ::1] dy,        # IN  (N, C, HW) (may be grad_input)
                         const floating[:, :, ::1] x,         # IN  (N, C, HW)
                         const double[::1] k,                 # IN  (C,)
                         const double[::1] b,                 # IN  (C,)
                         const double[::1] c0,                # IN  (C,)
                         floating[:, :, ::1] grad_input,      # OUT (N, C, HW)
                         int num_threads):
    """grad_input = k * dy + b * x + c0 per channel (the input gradient of a batch norm,
    its coefficients computed from the sums over every process)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t chunk = chunk_size(C, HW)
    cdef Py_ssize_t c, n
    with nogil:
        for c in prange(C, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
            for n in range(N):
                combine_run(&dy[n, c, 0], &x[n, c, 0], &grad_input[n, c, 0], HW,
                            <floating> k[c], <floating> b[c], <floating> c0[c])
