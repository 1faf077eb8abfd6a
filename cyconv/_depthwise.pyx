"""Depthwise 2-D convolution kernels (groups == input channels), without im2col.

Layouts (row-major, C-contiguous), M = output channels per input channel:
    x            (N, C, H, W)          input batch
    weight       (C*M, taps)           the (C*M, 1, kh, kw) weight viewed flat, taps = kh*kw
    out          (N, C*M, OH, OW)      output channel c*M + m reads input channel c only
    planes       (threads, plane_size) one padded input plane per thread

A plane is copied once into the thread's workspace as R = (OH-1)*sh + (kh-1)*dh + 1
padded rows, each split by stride phase into stride_w rows of L = direct_row_length
elements (row (r, phase) = padded_row of input row r - ph, as _conv's direct
kernel prepares them).  Tap t = (ki, kj) of output row oh is then the contiguous
run at oh*row_step + tap_offset[t], row_step = sh*sw*L and tap_offset[t] =
(ki*dh*sw + kj*dw % sw)*L + kj*dw // sw, whatever the stride, padding and dilation.

Forward: prange over (image, channel) planes; each output row of the M
channels is one call of the direct kernel's row function (C, vectorised).
Backward: prange over channels, the images in order inside, so the weight and
bias gradients, sums over images, are added in the same order for any thread
count; the input gradient of a plane is scattered tap by tap into a padded
plane (the transpose of the forward's reads) and copied out.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from cyconv._conv cimport Geometry, padded_row, valid_range
from cyconv._elementwise cimport relu_mask_run
from cyconv._reduce cimport sum_run

cdef extern from "_depthwise.h" nogil:
    void conv_row_direct_float(const float* weight, const float* bias, const float* rows,
                               const Py_ssize_t* tap_offset, int OC, int K, int OW, int relu,
                               float* out, Py_ssize_t P)
    void conv_row_direct_double(const double* weight, const double* bias, const double* rows,
                                const Py_ssize_t* tap_offset, int OC, int K, int OW, int relu,
                                double* out, Py_ssize_t P)
    void depthwise_weight_grad_float(const float* dy, const float* rows,
                                     const Py_ssize_t* tap_offset, int taps, int OH, int OW,
                                     Py_ssize_t row_step, double* sums)
    void depthwise_weight_grad_double(const double* dy, const double* rows,
                                      const Py_ssize_t* tap_offset, int taps, int OH, int OW,
                                      Py_ssize_t row_step, double* sums)
    void depthwise_scatter_row_float(float* rows, const Py_ssize_t* tap_offset,
                                     const float* weight, int taps, const float* dy_row, int OW)
    void depthwise_scatter_row_double(double* rows, const Py_ssize_t* tap_offset,
                                      const double* weight, int taps, const double* dy_row,
                                      int OW)


cdef inline int padded_rows(Geometry g) noexcept nogil:
    """R: the padded input rows that the windows read."""
    return (g.out_height - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1


def plane_size(Geometry g, Py_ssize_t L):
    """Elements of one prepared plane: R * stride_w * L."""
    return padded_rows(g) * g.stride_w * L


cdef void set_tap_offsets(Py_ssize_t* tap_offset, Geometry g, Py_ssize_t L) noexcept:
    cdef int ki, kj
    for ki in range(g.kernel_h):
        for kj in range(g.kernel_w):
            tap_offset[ki * g.kernel_w + kj] = (
                (ki * g.dilation_h * g.stride_w + kj * g.dilation_w % g.stride_w) * L
                + kj * g.dilation_w // g.stride_w)


cdef void prepare_plane(const floating* image, floating* plane, Geometry g,
                        Py_ssize_t L) noexcept nogil:
    """plane (R, stride_w, L) <- one input plane (H, W), padded and split by stride phase."""
    cdef int r, ih, phase
    cdef const floating* src
    for r in range(padded_rows(g)):
        ih = r - g.pad_h
        src = image + <Py_ssize_t> ih * g.width if 0 <= ih < g.height else NULL
        for phase in range(g.stride_w):
            padded_row(src, plane + (<Py_ssize_t> r * g.stride_w + phase) * L, phase, g, L)


cdef void unpad_plane(const floating* plane, floating* image, Geometry g,
                      Py_ssize_t L) noexcept nogil:
    """image (H, W) <- the padded plane (R, stride_w, L) without its padding: the inverse
    of prepare_plane, with 0 for the input pixels that no window reads."""
    cdef int R = padded_rows(g), ih, r, phase, lo, hi, j
    cdef const floating* src
    cdef floating* dst
    for ih in range(g.height):
        dst = image + <Py_ssize_t> ih * g.width
        r = ih + g.pad_h
        if r >= R:
            memset(dst, 0, g.width * sizeof(floating))
            continue
        if g.stride_w == 1:
            memcpy(dst, plane + <Py_ssize_t> r * L + g.pad_w, g.width * sizeof(floating))
            continue
        memset(dst, 0, g.width * sizeof(floating))
        for phase in range(g.stride_w):
            # element j of phase row is input column phase + stride_w*j - pad_w
            valid_range(phase - g.pad_w, g.stride_w, g.width, <int> L, &lo, &hi)
            src = plane + (<Py_ssize_t> r * g.stride_w + phase) * L
            for j in range(lo, hi):
                dst[phase + g.stride_w * j - g.pad_w] = src[j]


def depthwise_forward(const floating[:, :, :, ::1] x,   # IN   (N, C, H, W)
                      const floating[:, ::1] weight,   # IN   (C*M, taps)
                      const floating[::1] bias,        # IN   (C*M,), or empty for no bias
                      Py_ssize_t[::1] tap_offset,      # WORK (taps,)
                      floating[:, ::1] planes,         # WORK (threads, R*stride_w*L)
                      floating[:, :, :, ::1] out,      # OUT  (N, C*M, OH, OW)
                      Geometry g, Py_ssize_t L, bint fuse_relu, int num_threads):
    """out = depthwise conv(x) + bias (then max(., 0) when fuse_relu), plane by plane."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], task
    cdef int M = out.shape[1] // C, taps = weight.shape[1], n, c, oh
    cdef Py_ssize_t P = <Py_ssize_t> g.out_height * g.out_width
    cdef Py_ssize_t row_step = <Py_ssize_t> g.stride_h * g.stride_w * L
    cdef const floating* bias_ptr = &bias[0] if bias.shape[0] > 0 else NULL
    cdef floating* plane
    set_tap_offsets(&tap_offset[0], g, L)
    with nogil:
        for task in prange(N * C, schedule='dynamic', num_threads=num_threads):
            n = task // C
            c = task % C
            plane = &planes[threadid(), 0]
            prepare_plane(&x[n, c, 0, 0], plane, g, L)
            for oh in range(g.out_height):
                if floating is float:
                    conv_row_direct_float(&weight[c * M, 0], bias_ptr + c * M if bias_ptr else NULL,
                                          plane + oh * row_step, &tap_offset[0], M, taps,
                                          g.out_width, fuse_relu, &out[n, c * M, oh, 0], P)
                else:
                    conv_row_direct_double(&weight[c * M, 0], bias_ptr + c * M if bias_ptr else NULL,
                                           plane + oh * row_step, &tap_offset[0], M, taps,
                                           g.out_width, fuse_relu, &out[n, c * M, oh, 0], P)


cdef void add_plane_grads(const floating* dy, const floating* plane, const Py_ssize_t* tap_offset,
                          int M, int taps, Geometry g, Py_ssize_t L, bint has_bias,
                          double* sums) noexcept nogil:
    """sums (M, taps + 1) += for each of the M output planes dy (M, OH, OW): the weight
    gradient of its taps over the prepared input plane, then the bias gradient."""
    cdef Py_ssize_t P = <Py_ssize_t> g.out_height * g.out_width
    cdef Py_ssize_t row_step = <Py_ssize_t> g.stride_h * g.stride_w * L
    cdef int m
    for m in range(M):
        if floating is float:
            depthwise_weight_grad_float(dy + m * P, plane, tap_offset, taps, g.out_height,
                                        g.out_width, row_step, sums + m * (taps + 1))
        else:
            depthwise_weight_grad_double(dy + m * P, plane, tap_offset, taps, g.out_height,
                                         g.out_width, row_step, sums + m * (taps + 1))
        if has_bias:
            sums[m * (taps + 1) + taps] += sum_run(dy + m * P, P)


cdef void plane_input_grad(const floating* dy, const floating* weight,
                           const Py_ssize_t* tap_offset, int M, int taps, Geometry g,
                           Py_ssize_t L, floating* grad_plane, floating* image_grad) noexcept nogil:
    """image_grad (H, W) = the gradient of one input plane from its M output planes dy
    (M, OH, OW) and their weights (M, taps), scattered into grad_plane (R, stride_w, L)."""
    cdef int R = padded_rows(g)
    cdef Py_ssize_t row_step = <Py_ssize_t> g.stride_h * g.stride_w * L
    cdef Py_ssize_t P = <Py_ssize_t> g.out_height * g.out_width
    cdef int m, oh
    memset(grad_plane, 0, R * g.stride_w * L * sizeof(floating))
    for m in range(M):
        for oh in range(g.out_height):
            if floating is float:
                depthwise_scatter_row_float(grad_plane + oh * row_step, tap_offset,
                                            weight + m * taps, taps,
                                            dy + m * P + oh * g.out_width, g.out_width)
            else:
                depthwise_scatter_row_double(grad_plane + oh * row_step, tap_offset,
                                             weight + m * taps, taps,
                                             dy + m * P + oh * g.out_width, g.out_width)
    unpad_plane(grad_plane, image_grad, g, L)


def depthwise_backward(const floating[:, :, :, ::1] grad_out,  # IN    (N, C*M, OH, OW)
                       const floating[:, :, :, ::1] x,         # IN    (N, C, H, W) the forward input
                       const floating[:, :, :, ::1] out,       # IN    (N, C*M, OH, OW) forward output (relu mask)
                       const floating[:, ::1] weight,         # IN    (C*M, taps)
                       floating[:, ::1] grad_weight,          # INOUT (C*M, taps), accumulated
                       floating[::1] grad_bias,               # INOUT (C*M,), accumulated; empty for no bias
                       Py_ssize_t[::1] tap_offset,            # WORK  (taps,)
                       floating[:, ::1] planes,               # WORK  (threads, R*stride_w*L)
                       floating[:, ::1] grad_planes,          # WORK  (threads, R*stride_w*L) for input grad
                       floating[:, ::1] masked_grad,          # WORK  (threads, M*OH*OW) when fuse_relu
                       double[:, ::1] sums,                   # WORK  (threads, M*(taps + 1))
                       floating[:, :, :, ::1] grad_input,     # OUT   (N, C, H, W); unused without input grad
                       Geometry g, Py_ssize_t L, bint fuse_relu, bint need_input_grad,
                       int num_threads):
    """dW, db (sums over images, in image order) and dx, channel by channel (prange over c).

    With fuse_relu, dY is first masked by the forward output's sign.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], c, n
    cdef int M = grad_out.shape[1] // C, taps = weight.shape[1], slot, m, t
    cdef Py_ssize_t MP = <Py_ssize_t> M * g.out_height * g.out_width
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef const floating* dy
    cdef double* channel_sums
    set_tap_offsets(&tap_offset[0], g, L)
    with nogil:
        for c in prange(C, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            channel_sums = &sums[slot, 0]
            memset(channel_sums, 0, M * (taps + 1) * sizeof(double))
            for n in range(N):
                dy = &grad_out[n, c * M, 0, 0]
                if fuse_relu:
                    relu_mask_run(dy, &out[n, c * M, 0, 0], &masked_grad[slot, 0], MP)
                    dy = &masked_grad[slot, 0]
                prepare_plane(&x[n, c, 0, 0], &planes[slot, 0], g, L)
                add_plane_grads(dy, &planes[slot, 0], &tap_offset[0], M, taps, g, L, has_bias,
                                channel_sums)
                if need_input_grad:
                    plane_input_grad(dy, &weight[c * M, 0], &tap_offset[0], M, taps, g, L,
                                     &grad_planes[slot, 0], &grad_input[n, c, 0, 0])
            for m in range(M):
                for t in range(taps):
                    grad_weight[c * M + m, t] += <floating> channel_sums[m * (taps + 1) + t]
                if has_bias:
                    grad_bias[c * M + m] += <floating> channel_sums[m * (taps + 1) + taps]
