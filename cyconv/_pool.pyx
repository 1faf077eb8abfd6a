"""Pooling kernels: max, average and global average, forward and backward.

Layouts: x (N, C, H, W), out (N, C, OH, OW), argmax (N, C, OH, OW) int32 holding
the flat index ih*W + iw of each window's maximum inside its input plane.
Each (n, c) plane belongs to one thread (prange over the N*C planes), so results
do not depend on the thread count.  Windows follow PyTorch: out size
(H + 2p - k) // s + 1, padding at most k // 2, so no window is empty.
"""
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset

from cyconv._parallel cimport chunk_size
from cyconv._reduce cimport sum_run


cdef inline void fill_run(floating* dst, Py_ssize_t length, floating value) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(length):
        dst[i] = value


cdef struct Window:
    int h0, h1, w0, w1   # input rows [h0, h1) and columns [w0, w1), padding cut off


cdef inline Window window_at(Geometry g, int oh, int ow) noexcept nogil:
    """The window of output position (oh, ow).  (Returned by value: inside a prange, a
    variable assigned only through a pointer would not be made private to each thread.)"""
    cdef Window w
    w.h0 = max(oh * g.stride_h - g.pad_h, 0)
    w.h1 = min(oh * g.stride_h - g.pad_h + g.kernel_h, g.height)
    w.w0 = max(ow * g.stride_w - g.pad_w, 0)
    w.w1 = min(ow * g.stride_w - g.pad_w + g.kernel_w, g.width)
    return w


cdef inline int window_count(Geometry g, Window w, bint count_include_pad) noexcept nogil:
    """The divisor of an average: the kernel's size, or the inputs the window covers."""
    return g.kernel_h * g.kernel_w if count_include_pad else (w.h1 - w.h0) * (w.w1 - w.w0)


cdef inline int first_nan(const floating* plane, int W, Window w) noexcept nogil:
    """Flat index of the first NaN of the window (its first element when there is none)."""
    cdef int ih, iw
    for ih in range(w.h0, w.h1):
        for iw in range(w.w0, w.w1):
            if plane[ih * W + iw] != plane[ih * W + iw]:
                return ih * W + iw
    return w.h0 * W + w.w0


cdef inline int window_argmax(const floating* plane, int W, Window w) noexcept nogil:
    """Flat index of the window's first maximum; a NaN wins (the first one), as in PyTorch.

    Selects, not branches (the winner's position is random: a branch would
    mispredict half the time); strict '>' keeps the first maximum.
    """
    cdef int ih, iw, best_index = w.h0 * W + w.w0
    cdef floating best = plane[best_index], v
    cdef bint has_nan = 0
    for ih in range(w.h0, w.h1):
        for iw in range(w.w0, w.w1):
            v = plane[ih * W + iw]
            best_index = (ih * W + iw) if v > best else best_index
            best = v if v > best else best
            has_nan = has_nan | (v != v)
    return first_nan(plane, W, w) if has_nan else best_index


# C kernels with a float and a double version, one name each (see _typed.h)
cdef extern from "_row_loops.h" nogil:
    # (const T* top, const T* bottom, T* out, int* where, n, int first, int W) -> has a NaN
    int max_pool_2x2_row(...)
    # (const T* grad, const int* where, T* top, T* bottom, n, int first, int W)
    void max_pool_2x2_backward_row(...)
    # (const T* src, T* out, int* where, n, int stride, int first) -> has a NaN
    int max_pool_tap(...)


cdef void max_pool_2x2_row_with_nans(const floating* src, floating* dst, int* argmax,
                           Geometry g, int oh) noexcept nogil:
    """Output row oh of a 2x2 window without padding: each output reads its 4 inputs once.

    argmax may be NULL (inference).  The first maximum wins, a NaN wins over
    numbers (the first NaN).
    """
    cdef int ow, top, best_index, W = g.width
    cdef floating a, b, c, d, best
    for ow in range(g.out_width):
        top = oh * g.stride_h * W + ow * g.stride_w
        a = src[top]
        b = src[top + 1]
        c = src[top + W]
        d = src[top + W + 1]
        best, best_index = a, top
        best_index = (top + 1) if b > best else best_index
        best = b if b > best else best
        best_index = (top + W) if c > best else best_index
        best = c if c > best else best
        best_index = (top + W + 1) if d > best else best_index
        best = d if d > best else best
        if (a != a) | (b != b) | (c != c) | (d != d):
            best_index = first_nan(src, W, window_at(g, oh, ow))
            best = src[best_index]
        dst[oh * g.out_width + ow] = best
        if argmax != NULL:
            argmax[oh * g.out_width + ow] = best_index


cdef void max_pool_2x2_plane(const floating* src, floating* dst, int* argmax,
                             Geometry g) noexcept nogil:
    """A whole plane of the 2x2 window without padding (argmax may be NULL).

    With stride 2 (the usual case) each row goes first through the vectorised
    C loop of _row_loops.h, which has no NaN rule; a row that held a NaN is
    redone by max_pool_2x2_row_with_nans.
    """
    cdef int oh, first, has_nan, W = g.width, OW = g.out_width
    for oh in range(g.out_height):
        has_nan = 1
        if g.stride_h == 2 and g.stride_w == 2:
            first = 2 * oh * W
            has_nan = max_pool_2x2_row(src + first, src + first + W, dst + oh * OW,
                                       argmax + oh * OW if argmax != NULL else NULL,
                                       <Py_ssize_t> OW, first, W)
        if has_nan:
            max_pool_2x2_row_with_nans(src, dst, argmax, g, oh)


cdef void max_pool_windows(const floating* src, floating* dst, int* argmax, Geometry g,
                           int oh, int ow0, int ow1) noexcept nogil:
    """Outputs [ow0, ow1) of row oh, window by window (argmax may be NULL)."""
    cdef int ow, best_index
    for ow in range(ow0, ow1):
        best_index = window_argmax(src, g.width, window_at(g, oh, ow))
        dst[oh * g.out_width + ow] = src[best_index]
        if argmax != NULL:
            argmax[oh * g.out_width + ow] = best_index


cdef void max_pool_row(const floating* src, floating* dst, int* argmax, Geometry g,
                       int oh) noexcept nogil:
    """Output row oh of any window (argmax may be NULL).

    The outputs [lo, hi) whose windows lie inside the width go tap by tap through
    the vectorised C loop of _row_loops.h (which has no NaN rule), the others
    window by window; a row that held a NaN is redone window by window.
    """
    cdef int W = g.width, OW = g.out_width, s = g.stride_w, p = g.pad_w
    cdef int lo = (p + s - 1) // s, hi = 0, ow, ih, kj, start, has_nan = 0
    cdef Window w = window_at(g, oh, 0)
    cdef floating* row = dst + oh * OW
    cdef int* where = argmax + oh * OW if argmax != NULL else NULL
    if W + p >= g.kernel_w:
        hi = min((W + p - g.kernel_w) // s + 1, OW)
    lo = min(lo, hi)
    fill_run(row + lo, hi - lo, -INFINITY)
    if where != NULL:
        for ow in range(lo, hi):
            where[ow] = w.h0 * W + ow * s - p
    for ih in range(w.h0, w.h1 if hi > lo else w.h0):
        for kj in range(g.kernel_w):
            start = ih * W + lo * s - p + kj
            has_nan |= max_pool_tap(src + start, row + lo, where + lo if where != NULL else NULL,
                                    <Py_ssize_t> (hi - lo), s, start)
    if has_nan:
        max_pool_windows(src, dst, argmax, g, oh, 0, OW)
    else:
        max_pool_windows(src, dst, argmax, g, oh, 0, lo)
        max_pool_windows(src, dst, argmax, g, oh, hi, OW)


def max_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (N, C, OH, OW)
                       int[:, :, :, ::1] argmax,         # OUT (N, C, OH, OW), or empty when not needed
                       Geometry g, int num_threads):
    """out = the maximum of each window; argmax = where it is (the first maximum)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int oh
    cdef bint is_2x2 = g.kernel_h == 2 and g.kernel_w == 2 and g.pad_h == 0 and g.pad_w == 0
    cdef int* where
    with nogil:
        for plane in prange(N * C, schedule='dynamic', num_threads=num_threads,
                            chunksize=chunk_size(N * C, g.out_height * g.out_width)):
            n = plane // C
            c = plane % C
            where = &argmax[n, c, 0, 0] if argmax.shape[0] > 0 else NULL
            if is_2x2:
                max_pool_2x2_plane(&x[n, c, 0, 0], &out[n, c, 0, 0], where, g)
                continue
            for oh in range(g.out_height):
                max_pool_row(&x[n, c, 0, 0], &out[n, c, 0, 0], where, g, oh)


cdef void max_pool_2x2_backward_plane(const floating* dy, const int* where, floating* dst,
                                      Geometry g) noexcept nogil:
    """The input gradient of a whole plane for 2x2 windows with stride 2 (no padding).

    The windows tile the plane without overlap, so each pair of input rows is
    written once by the vectorised C loop; only the column and row that no
    window covers (odd W or H) are zero-filled.
    """
    cdef int oh, first, W = g.width, OW = g.out_width
    for oh in range(g.out_height):
        first = 2 * oh * W
        max_pool_2x2_backward_row(dy + oh * OW, where + oh * OW, dst + first, dst + first + W,
                                  <Py_ssize_t> OW, first, W)
        if W > 2 * OW:
            dst[first + W - 1] = 0
            dst[first + 2 * W - 1] = 0
    if g.height > 2 * g.out_height:
        memset(dst + 2 * g.out_height * W, 0,
               (g.height - 2 * g.out_height) * W * sizeof(floating))


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (N, C, OH, OW)
                        const int[:, :, :, ::1] argmax,         # IN  (N, C, OH, OW)
                        floating[:, :, :, ::1] grad_input,      # OUT (N, C, H, W)
                        Geometry g, int num_threads):
    """grad_input = each output gradient added to its window's maximum (overlaps sum)."""
    cdef Py_ssize_t N = grad_out.shape[0], C = grad_out.shape[1]
    cdef Py_ssize_t HW = grad_input.shape[2] * grad_input.shape[3]
    cdef Py_ssize_t OHW = grad_out.shape[2] * grad_out.shape[3]
    cdef Py_ssize_t plane, n, c, o
    cdef bint tiles_2x2 = (g.kernel_h == 2 and g.kernel_w == 2 and g.stride_h == 2
                           and g.stride_w == 2 and g.pad_h == 0 and g.pad_w == 0)
    cdef floating* dst
    cdef const floating* dy
    cdef const int* where
    with nogil:
        for plane in prange(N * C, schedule='dynamic', num_threads=num_threads,
                            chunksize=chunk_size(N * C, g.out_height * g.out_width)):
            n = plane // C
            c = plane % C
            dst = &grad_input[n, c, 0, 0]
            dy = &grad_out[n, c, 0, 0]
            where = &argmax[n, c, 0, 0]
            if tiles_2x2:
                max_pool_2x2_backward_plane(dy, where, dst, g)
                continue
            memset(dst, 0, HW * sizeof(floating))
            for o in range(OHW):
                dst[where[o]] += dy[o]


def avg_pool2d_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                       floating[:, :, :, ::1] out,       # OUT (N, C, OH, OW)
                       Geometry g, bint count_include_pad, int num_threads):
    """out = the mean of each window (padding counted as zeros when count_include_pad)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int W = g.width, OW = g.out_width, oh, ow, ih
    cdef Window w
    cdef const floating* src
    cdef double total
    with nogil:
        for plane in prange(N * C, schedule='dynamic', num_threads=num_threads,
                            chunksize=chunk_size(N * C, g.out_height * g.out_width)):
            n = plane // C
            c = plane % C
            src = &x[n, c, 0, 0]
            for oh in range(g.out_height):
                for ow in range(OW):
                    w = window_at(g, oh, ow)
                    total = 0
                    for ih in range(w.h0, w.h1):
                        total = total + sum_run(src + ih * W + w.w0, w.w1 - w.w0)
                    out[n, c, oh, ow] = <floating> (total / window_count(g, w, count_include_pad))


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out,  # IN  (N, C, OH, OW)
                        floating[:, :, :, ::1] grad_input,      # OUT (N, C, H, W)
                        Geometry g, bint count_include_pad, int num_threads):
    """grad_input = each output gradient spread evenly over its window (overlaps sum)."""
    cdef Py_ssize_t N = grad_out.shape[0], C = grad_out.shape[1]
    cdef Py_ssize_t plane, n, c
    cdef int W = g.width, OW = g.out_width, oh, ow, ih, iw
    cdef Window w
    cdef floating* dst
    cdef floating share
    with nogil:
        for plane in prange(N * C, schedule='dynamic', num_threads=num_threads,
                            chunksize=chunk_size(N * C, g.out_height * g.out_width)):
            n = plane // C
            c = plane % C
            dst = &grad_input[n, c, 0, 0]
            memset(dst, 0, <Py_ssize_t> g.height * W * sizeof(floating))
            for oh in range(g.out_height):
                for ow in range(OW):
                    w = window_at(g, oh, ow)
                    share = grad_out[n, c, oh, ow] / window_count(g, w, count_include_pad)
                    for ih in range(w.h0, w.h1):
                        for iw in range(w.w0, w.w1):
                            dst[ih * W + iw] += share


def global_avg_pool2d_forward(const floating[:, :, ::1] x,  # IN  (N, C, H*W)
                              floating[:, ::1] out,         # OUT (N, C)
                              int num_threads):
    """out[n, c] = the mean of plane (n, c).

    The planes are often small (4x4 to 7x7 at the end of a network): the loop over
    them runs on plain pointers, and threads take them in shrinking chunks ('guided')
    rather than one at a time, whose shared counter cost more than a plane's sum.
    """
    cdef Py_ssize_t planes = x.shape[0] * x.shape[1], HW = x.shape[2], plane
    if planes == 0:
        return
    cdef const floating* src = &x[0, 0, 0]
    cdef floating* dst = &out[0, 0]
    for plane in prange(planes, nogil=True, schedule='guided', num_threads=num_threads,
                        chunksize=chunk_size(planes, 1)):
        dst[plane] = <floating> (sum_run(src + plane * HW, HW) / HW)


def global_avg_pool2d_backward(const floating[:, ::1] grad_out,  # IN  (N, C)
                               floating[:, :, ::1] grad_input,   # OUT (N, C, H*W)
                               int num_threads):
    """grad_input[n, c, :] = grad_out[n, c] / (H*W) (on pointers, guided: see forward)."""
    cdef Py_ssize_t planes = grad_input.shape[0] * grad_input.shape[1]
    cdef Py_ssize_t HW = grad_input.shape[2], plane
    if planes == 0:
        return
    cdef const floating* src = &grad_out[0, 0]
    cdef floating* dst = &grad_input[0, 0, 0]
    for plane in prange(planes, nogil=True, schedule='guided', num_threads=num_threads,
                        chunksize=chunk_size(planes, HW)):
        fill_run(dst + plane * HW, HW, src[plane] / HW)
