"""2-D convolution kernels: im2col + GEMM forward, GEMM + col2im backward.

Layouts (row-major, C-contiguous):
    x            (N, C, H, W)        input batch
    weight       (OC, K)             the (OC, C, kh, kw) weight viewed flat, K = C*kh*kw
    cols         (S, K, P)           im2col workspace, P = OH*OW; S = N when the
                                     columns are kept for backward, else one slot per thread
    out          (N, OC, OH, OW)

The batch is split across threads (prange over n): every thread builds the
columns of its own images and multiplies them by the weight with a
single-threaded BLAS call, so no two threads write the same output element and
results do not depend on the thread count.  Backward never inserts zeros for
strides: col2im scatters each column entry back onto the input pixel it was
read from.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memset

from cyconv._blas cimport gemm
from cyconv._reduce cimport sum_run


cdef void valid_range(int offset, int stride, int size, int out_size,
                      int* first, int* last) noexcept nogil:
    """Output positions o in [first, last) read input o*stride + offset inside [0, size)."""
    cdef int lo = 0, hi
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    if size - 1 - offset < 0:
        hi = 0
    else:
        hi = (size - 1 - offset) // stride + 1
    if hi > out_size:
        hi = out_size
    if lo > out_size:
        lo = out_size
    if hi < lo:
        hi = lo
    first[0] = lo
    last[0] = hi


cdef void im2col(const floating* image, floating* cols, Geometry g) noexcept nogil:
    """cols (K, P) <- the receptive field of every output pixel of one image (C, H, W).

    Row (c, ki, kj) of cols holds, for each output pixel (oh, ow), the input
    pixel (oh*sh - ph + ki*dh, ow*sw - pw + kj*dw), or 0 where that is padding.
    """
    cdef int c, ki, kj, oh, ow, ih, off_h, off_w
    cdef int oh_lo, oh_hi, ow_lo, ow_hi
    cdef int OW = g.out_width
    cdef Py_ssize_t P = <Py_ssize_t> g.out_height * OW
    cdef floating* dst
    cdef const floating* src
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            off_h = ki * g.dilation_h - g.pad_h
            valid_range(off_h, g.stride_h, g.height, g.out_height, &oh_lo, &oh_hi)
            for kj in range(g.kernel_w):
                off_w = kj * g.dilation_w - g.pad_w
                valid_range(off_w, g.stride_w, g.width, OW, &ow_lo, &ow_hi)
                dst = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * P
                if oh_lo > 0:
                    memset(dst, 0, oh_lo * OW * sizeof(floating))
                for oh in range(oh_lo, oh_hi):
                    ih = oh * g.stride_h + off_h
                    src = image + (<Py_ssize_t> c * g.height + ih) * g.width + off_w
                    for ow in range(ow_lo):
                        dst[oh * OW + ow] = 0
                    if g.stride_w == 1:
                        for ow in range(ow_lo, ow_hi):
                            dst[oh * OW + ow] = src[ow]
                    elif g.stride_w == 2:
                        for ow in range(ow_lo, ow_hi):
                            dst[oh * OW + ow] = src[2 * ow]
                    else:
                        for ow in range(ow_lo, ow_hi):
                            dst[oh * OW + ow] = src[ow * g.stride_w]
                    for ow in range(ow_hi, OW):
                        dst[oh * OW + ow] = 0
                if oh_hi < g.out_height:
                    memset(dst + oh_hi * OW, 0, (g.out_height - oh_hi) * OW * sizeof(floating))


cdef void col2im(const floating* cols, floating* image, Geometry g) noexcept nogil:
    """image (C, H, W) <- the column gradients (K, P) scattered back, summed.

    The transpose of im2col: every entry goes back to the input pixel it was
    read from (padding positions are dropped).  image is overwritten.
    """
    cdef int c, ki, kj, oh, ow, ih, off_h, off_w
    cdef int oh_lo, oh_hi, ow_lo, ow_hi
    cdef int OW = g.out_width
    cdef Py_ssize_t P = <Py_ssize_t> g.out_height * OW
    cdef const floating* src
    cdef floating* dst
    memset(image, 0, <Py_ssize_t> g.channels * g.height * g.width * sizeof(floating))
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            off_h = ki * g.dilation_h - g.pad_h
            valid_range(off_h, g.stride_h, g.height, g.out_height, &oh_lo, &oh_hi)
            for kj in range(g.kernel_w):
                off_w = kj * g.dilation_w - g.pad_w
                valid_range(off_w, g.stride_w, g.width, OW, &ow_lo, &ow_hi)
                src = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * P
                for oh in range(oh_lo, oh_hi):
                    ih = oh * g.stride_h + off_h
                    dst = image + (<Py_ssize_t> c * g.height + ih) * g.width + off_w
                    if g.stride_w == 1:
                        for ow in range(ow_lo, ow_hi):
                            dst[ow] += src[oh * OW + ow]
                    elif g.stride_w == 2:
                        for ow in range(ow_lo, ow_hi):
                            dst[2 * ow] += src[oh * OW + ow]
                    else:
                        for ow in range(ow_lo, ow_hi):
                            dst[ow * g.stride_w] += src[oh * OW + ow]


def conv2d_forward(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                   const floating[:, ::1] weight,      # IN  (OC, K)
                   const floating[::1] bias,           # IN  (OC,), or empty for no bias
                   floating[:, :, ::1] cols,           # OUT (N, K, P) kept for backward, or (threads, K, P)
                   floating[:, :, :, ::1] out,         # OUT (N, OC, OH, OW)
                   Geometry g, bint cols_per_sample, bint fuse_relu, int num_threads):
    """out = weight @ im2col(x) + bias (then max(., 0) when fuse_relu), image by image."""
    cdef Py_ssize_t N = x.shape[0]
    cdef int OC = weight.shape[0], K = weight.shape[1]
    cdef int P = g.out_height * g.out_width
    cdef bint has_bias = bias.shape[0] > 0
    cdef Py_ssize_t n, slot, oc, p
    cdef floating* y
    cdef floating b
    if N == 0:
        return
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            slot = n if cols_per_sample else threadid()
            im2col(&x[n, 0, 0, 0], &cols[slot, 0, 0], g)
            gemm(False, False, OC, P, K, 1, &weight[0, 0], K, &cols[slot, 0, 0], P,
                 0, &out[n, 0, 0, 0], P)
            y = &out[n, 0, 0, 0]
            for oc in range(OC):
                b = bias[oc] if has_bias else 0
                if fuse_relu:
                    for p in range(P):
                        y[oc * P + p] = max(y[oc * P + p] + b, 0)
                elif has_bias:
                    for p in range(P):
                        y[oc * P + p] += b


def conv2d_backward(const floating[:, :, :, ::1] grad_out,   # IN    (N, OC, OH, OW)
                    const floating[:, ::1] weight,          # IN    (OC, K)
                    const floating[:, :, ::1] cols,         # IN    (N, K, P) from the forward pass
                    floating[:, ::1] grad_weight,           # INOUT (OC, K), accumulated
                    floating[::1] grad_bias,                # INOUT (OC,), accumulated; empty for no bias
                    floating[:, :, ::1] grad_weight_parts,  # WORK  (N, OC, K)
                    floating[:, :, ::1] grad_cols,          # WORK  (threads, K, P); unused without input grad
                    floating[:, :, :, ::1] grad_input,      # OUT   (N, C, H, W); unused without input grad
                    Geometry g, bint need_input_grad, int num_threads):
    """Accumulate dW += sum_n dY_n @ cols_n^T and db += sum dY; dx = col2im(W^T @ dY_n).

    Per image (prange over n) the weight gradient goes to its own slice of
    grad_weight_parts, then the slices are summed in image order (prange over
    output channels): the same additions in the same order for any thread count.
    """
    cdef Py_ssize_t N = grad_out.shape[0]
    cdef int OC = weight.shape[0], K = weight.shape[1]
    cdef int P = g.out_height * g.out_width
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef Py_ssize_t n, sample, slot, oc, k, p
    cdef double bias_sum
    if N == 0:
        return
    with nogil:
        for n in prange(N, schedule='static', num_threads=num_threads):
            gemm(False, True, OC, K, P, 1, &grad_out[n, 0, 0, 0], P, &cols[n, 0, 0], P,
                 0, &grad_weight_parts[n, 0, 0], K)
            if need_input_grad:
                slot = threadid()
                gemm(True, False, K, P, OC, 1, &weight[0, 0], K, &grad_out[n, 0, 0, 0], P,
                     0, &grad_cols[slot, 0, 0], P)
                col2im(&grad_cols[slot, 0, 0], &grad_input[n, 0, 0, 0], g)
        for oc in prange(OC, schedule='static', num_threads=num_threads):
            for sample in range(N):
                for k in range(K):
                    grad_weight[oc, k] += grad_weight_parts[sample, oc, k]
            if has_bias:
                bias_sum = 0
                for sample in range(N):
                    # not "+=": in a prange that would make it a reduction variable
                    bias_sum = bias_sum + sum_run(&grad_out[sample, oc, 0, 0], P)
                grad_bias[oc] += <floating> bias_sum
