"""Pooling kernels: max, average and global average, forward and backward.

Layouts: x (N, C, H, W), out (N, C, OH, OW), argmax (N, C, OH, OW) int32 holding
the flat index ih*W + iw of each window's maximum inside its input plane.
Each (n, c) plane belongs to one thread (prange over the N*C planes), so results
do not depend on the thread count.  Windows follow PyTorch: out size
(H + 2p - k) // s + 1, padding at most k // 2, so no window is empty.
"""
from cython.parallel cimport prange
from libc.string cimport memset


def max_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (N, C, OH, OW)
                       int[:, :, :, ::1] argmax,         # OUT (N, C, OH, OW), or empty when not needed
                       Geometry g, int num_threads):
    """out = the maximum of each window; argmax = where it is (the first maximum)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int H = g.height, W = g.width, OH = g.out_height, OW = g.out_width
    cdef int oh, ow, ih, iw, h0, w0, h1, w1, best_index
    cdef bint store_argmax = argmax.shape[0] > 0
    cdef const floating* src
    cdef floating* dst
    cdef int* where
    cdef floating best, v
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            src = &x[n, c, 0, 0]
            dst = &out[n, c, 0, 0]
            for oh in range(OH):
                h0 = max(oh * g.stride_h - g.pad_h, 0)
                h1 = min(oh * g.stride_h - g.pad_h + g.kernel_h, H)
                for ow in range(OW):
                    w0 = max(ow * g.stride_w - g.pad_w, 0)
                    w1 = min(ow * g.stride_w - g.pad_w + g.kernel_w, W)
                    best_index = h0 * W + w0
                    best = src[best_index]
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            v = src[ih * W + iw]
                            # strict '>' keeps the first maximum; a NaN wins and stays
                            if v > best or (v != v and best == best):
                                best = v
                                best_index = ih * W + iw
                    dst[oh * OW + ow] = best
                    if store_argmax:
                        where = &argmax[n, c, 0, 0]
                        where[oh * OW + ow] = best_index


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (N, C, OH, OW)
                        const int[:, :, :, ::1] argmax,         # IN  (N, C, OH, OW)
                        floating[:, :, :, ::1] grad_input,      # OUT (N, C, H, W)
                        int num_threads):
    """grad_input = each output gradient added to its window's maximum (overlaps sum)."""
    cdef Py_ssize_t N = grad_out.shape[0], C = grad_out.shape[1]
    cdef Py_ssize_t HW = grad_input.shape[2] * grad_input.shape[3]
    cdef Py_ssize_t OHW = grad_out.shape[2] * grad_out.shape[3]
    cdef Py_ssize_t plane, n, c, o
    cdef floating* dst
    cdef const floating* dy
    cdef const int* where
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            dst = &grad_input[n, c, 0, 0]
            dy = &grad_out[n, c, 0, 0]
            where = &argmax[n, c, 0, 0]
            memset(dst, 0, HW * sizeof(floating))
            for o in range(OHW):
                dst[where[o]] += dy[o]


def avg_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (N, C, OH, OW)
                       Geometry g, bint count_include_pad, int num_threads):
    """out = the mean of each window (padding counted as zeros when count_include_pad)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int H = g.height, W = g.width, OH = g.out_height, OW = g.out_width
    cdef int oh, ow, ih, iw, h0, w0, h1, w1, count
    cdef const floating* src
    cdef floating* dst
    cdef double total
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            src = &x[n, c, 0, 0]
            dst = &out[n, c, 0, 0]
            for oh in range(OH):
                h0 = max(oh * g.stride_h - g.pad_h, 0)
                h1 = min(oh * g.stride_h - g.pad_h + g.kernel_h, H)
                for ow in range(OW):
                    w0 = max(ow * g.stride_w - g.pad_w, 0)
                    w1 = min(ow * g.stride_w - g.pad_w + g.kernel_w, W)
                    total = 0
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            total = total + src[ih * W + iw]
                    count = g.kernel_h * g.kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
                    dst[oh * OW + ow] = <floating> (total / count)


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (N, C, OH, OW)
                        floating[:, :, :, ::1] grad_input,      # OUT (N, C, H, W)
                        Geometry g, bint count_include_pad, int num_threads):
    """grad_input = each output gradient spread evenly over its window (overlaps sum)."""
    cdef Py_ssize_t N = grad_out.shape[0], C = grad_out.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int H = g.height, W = g.width, OH = g.out_height, OW = g.out_width
    cdef int oh, ow, ih, iw, h0, w0, h1, w1, count
    cdef floating* dst
    cdef const floating* dy
    cdef floating share
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            dst = &grad_input[n, c, 0, 0]
            dy = &grad_out[n, c, 0, 0]
            memset(dst, 0, <Py_ssize_t> H * W * sizeof(floating))
            for oh in range(OH):
                h0 = max(oh * g.stride_h - g.pad_h, 0)
                h1 = min(oh * g.stride_h - g.pad_h + g.kernel_h, H)
                for ow in range(OW):
                    w0 = max(ow * g.stride_w - g.pad_w, 0)
                    w1 = min(ow * g.stride_w - g.pad_w + g.kernel_w, W)
                    count = g.kernel_h * g.kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
                    share = dy[oh * OW + ow] / count
                    for ih in range(h0, h1):
                        for iw in range(w0, w1):
                            dst[ih * W + iw] += share


def global_avg_pool2d_forward(const floating[:, :, ::1] x,  # IN  (N, C, H*W)
                              floating[:, ::1] out,         # OUT (N, C)
                              int num_threads):
    """out[n, c] = the mean of plane (n, c)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], HW = x.shape[2]
    cdef Py_ssize_t plane, n, c, i
    cdef double total
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            total = 0
            for i in range(HW):
                total = total + x[n, c, i]
            out[n, c] = <floating> (total / HW)


def global_avg_pool2d_backward(const floating[:, ::1] grad_out,  # IN  (N, C)
                               floating[:, :, ::1] grad_input,   # OUT (N, C, H*W)
                               int num_threads):
    """grad_input[n, c, :] = grad_out[n, c] / (H*W)."""
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1], HW = grad_input.shape[2]
    cdef Py_ssize_t plane, n, c, i
    cdef floating share
    with nogil:
        for plane in prange(N * C, schedule='static', num_threads=num_threads):
            n = plane // C
            c = plane % C
            share = grad_out[n, c] / HW
            for i in range(HW):
                grad_input[n, c, i] = share
