"""2-D convolution kernels: im2col + GEMM forward, GEMM + col2im backward, and a
direct forward kernel for layers with few taps (K <= 64, e.g. an RGB input layer).

Layouts (row-major, C-contiguous):
    x            (N, C, H, W)        input batch
    weight       (OC, K)             the (OC, C, kh, kw) weight viewed flat, K = C*kh*kw
    out          (N, OC, OH, OW)     P = OH*OW output pixels per channel
    cols         (threads, K*T)      one im2col tile per thread, T = rows_per_tile*OW

The batch is split across threads (prange over n).  Each image is processed in
tiles of whole output rows, small enough (see rows_per_tile in nn/conv.py) that
a tile's columns stay in the core's cache between im2col and the matrix
product; the columns are never stored for the whole batch: backward rebuilds
them tile by tile.  Every thread multiplies with single-threaded BLAS calls, no
two threads write the same output element, and the tiles are fixed by the
shapes alone, so results do not depend on the thread count.  Images are dealt
out one at a time (schedule 'dynamic'), so a thread that loses its core to
another process does not hold the others up.  Backward never
inserts zeros for strides: col2im scatters each column entry back onto the
input pixel it was read from.

The direct forward (conv2d_forward_direct, C kernel in _direct_conv.h) takes
one (image, output row) per task: the input rows it reads are copied into the
thread's workspace, split by stride phase so that every tap is a contiguous
run, and all output channels of the row are accumulated in vector registers.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from cyconv._blas cimport gemm
from cyconv._elementwise cimport relu, relu_mask_run
from cyconv._reduce cimport sum_run

# C kernels with a float and a double version, one name each (see _typed.h)
cdef extern from "_row_loops.h" nogil:
    void gather_stride2(...)        # (T* dst, const T* src, n): dst[i] = src[2*i], i < n
    void scatter_add_stride2(...)   # (T* dst, const T* src, n): dst[2*i] += src[i], i < n


cdef extern from "_direct_conv.h" nogil:
    enum: DIRECT_COLUMNS
    enum: DIRECT_MAX_TAPS
    enum: DIRECT_VECTORIZED
    # (const T* weight, const T* bias, const T* rows, const Py_ssize_t* tap_offset, int OC,
    #  int K, int OW, int relu, T* out, Py_ssize_t P): one output row, all channels
    void conv_row_direct(...)

# the largest K = C*kh*kw that conv2d_forward_direct accepts, and whether this
# compiler built its vectorised kernel (else it is slower than im2col + GEMM)
MAX_DIRECT_TAPS = DIRECT_MAX_TAPS
DIRECT_IS_VECTORIZED = bool(DIRECT_VECTORIZED)


cdef inline void gather_strided(floating* dst, const floating* src, Py_ssize_t n,
                                int stride) noexcept nogil:
    """dst[j] = src[j*stride] for j < n: a memcpy for stride 1, the vectorised loop for 2."""
    cdef Py_ssize_t j
    if stride == 1:
        memcpy(dst, src, n * sizeof(floating))
    elif stride == 2:
        gather_stride2(dst, src, n)
    else:
        for j in range(n):
            dst[j] = src[j * stride]


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


cdef void im2col(const floating* image, floating* cols, Geometry g,
                 int oh0, int oh1) noexcept nogil:
    """cols (K, T) <- the receptive fields of output rows [oh0, oh1) of one image (C, H, W).

    T = (oh1 - oh0) * OW.  Row (c, ki, kj) of cols holds, for each output pixel
    (oh, ow), the input pixel (oh*sh - ph + ki*dh, ow*sw - pw + kj*dw), or 0
    where that falls in the padding.
    """
    cdef int c, ki, kj, oh, ow, ih, off_h, off_w
    cdef int oh_lo, oh_hi, ow_lo, ow_hi
    cdef int OW = g.out_width
    cdef Py_ssize_t T = <Py_ssize_t> (oh1 - oh0) * OW
    cdef floating* dst
    cdef const floating* src
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            off_h = ki * g.dilation_h - g.pad_h
            valid_range(off_h, g.stride_h, g.height, g.out_height, &oh_lo, &oh_hi)
            for kj in range(g.kernel_w):
                off_w = kj * g.dilation_w - g.pad_w
                valid_range(off_w, g.stride_w, g.width, OW, &ow_lo, &ow_hi)
                for oh in range(oh0, oh1):
                    dst = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * T + (oh - oh0) * OW
                    if oh < oh_lo or oh >= oh_hi:  # this kernel row reads padding
                        memset(dst, 0, OW * sizeof(floating))
                        continue
                    ih = oh * g.stride_h + off_h
                    src = image + (<Py_ssize_t> c * g.height + ih) * g.width + off_w
                    for ow in range(ow_lo):
                        dst[ow] = 0
                    gather_strided(dst + ow_lo, src + <Py_ssize_t> ow_lo * g.stride_w,
                                   ow_hi - ow_lo, g.stride_w)
                    for ow in range(ow_hi, OW):
                        dst[ow] = 0


cdef void col2im(const floating* cols, floating* image, Geometry g,
                 int oh0, int oh1) noexcept nogil:
    """image (C, H, W) += the column gradients (K, T) of output rows [oh0, oh1), scattered back.

    The transpose of im2col: every entry is added to the input pixel it was
    read from; entries that were padding are dropped.
    """
    cdef int c, ki, kj, oh, ow, ih, off_h, off_w
    cdef int oh_lo, oh_hi, ow_lo, ow_hi
    cdef int OW = g.out_width
    cdef Py_ssize_t T = <Py_ssize_t> (oh1 - oh0) * OW
    cdef const floating* src
    cdef floating* dst
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            off_h = ki * g.dilation_h - g.pad_h
            valid_range(off_h, g.stride_h, g.height, g.out_height, &oh_lo, &oh_hi)
            for kj in range(g.kernel_w):
                off_w = kj * g.dilation_w - g.pad_w
                valid_range(off_w, g.stride_w, g.width, OW, &ow_lo, &ow_hi)
                for oh in range(max(oh0, oh_lo), min(oh1, oh_hi)):
                    src = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * T + (oh - oh0) * OW
                    ih = oh * g.stride_h + off_h
                    dst = image + (<Py_ssize_t> c * g.height + ih) * g.width + off_w
                    if g.stride_w == 1:
                        for ow in range(ow_lo, ow_hi):
                            dst[ow] += src[ow]
                    elif g.stride_w == 2:
                        scatter_add_stride2(dst + 2 * ow_lo, src + ow_lo, ow_hi - ow_lo)
                    else:
                        for ow in range(ow_lo, ow_hi):
                            dst[ow * g.stride_w] += src[ow]


def direct_row_length(Geometry g):
    """Elements per prepared input row of conv2d_forward_direct (output width + taps' reach + slack)."""
    return g.out_width + ((g.kernel_w - 1) * g.dilation_w) // g.stride_w + DIRECT_COLUMNS


cdef void prepare_rows(const floating* image, floating* rows, Geometry g, int oh,
                       Py_ssize_t row_len) noexcept nogil:
    """rows <- the input rows that output row oh of one image (C, H, W) reads, for the direct kernel.

    Row ((c*kh + ki)*stride_w + phase) holds, at j < row_len, the padded input
    (c, oh*sh - ph + ki*dh, phase + stride_w*j - pw): 0 where that is padding
    or past the image.  Tap (c, ki, kj) then reads a contiguous run from row
    phase = kj*dw % stride_w at j = ow + kj*dw // stride_w.
    """
    cdef int c, ki, phase, ih, lo, hi
    cdef floating* dst
    cdef const floating* src
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            ih = oh * g.stride_h - g.pad_h + ki * g.dilation_h
            for phase in range(g.stride_w):
                dst = rows + ((c * g.kernel_h + ki) * g.stride_w + phase) * row_len
                if ih < 0 or ih >= g.height:  # a padding row
                    memset(dst, 0, row_len * sizeof(floating))
                    continue
                valid_range(phase - g.pad_w, g.stride_w, g.width, <int> row_len, &lo, &hi)
                # element j of this row is src[j * stride_w] for lo <= j < hi
                src = image + (<Py_ssize_t> c * g.height + ih) * g.width + phase - g.pad_w
                memset(dst, 0, lo * sizeof(floating))
                gather_strided(dst + lo, src + <Py_ssize_t> lo * g.stride_w, hi - lo, g.stride_w)
                memset(dst + hi, 0, (row_len - hi) * sizeof(floating))


def conv2d_forward_direct(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                          const floating[:, ::1] weight,   # IN  (OC, K), K <= MAX_DIRECT_TAPS
                          const floating[::1] bias,        # IN  (OC,), or empty for no bias
                          floating[:, ::1] rows,           # WORK (threads, C*kh*stride_w*row_length)
                          floating[:, :, :, ::1] out,      # OUT (N, OC, OH, OW)
                          Geometry g, bint fuse_relu, int num_threads):
    """out = weight * x + bias (then max(., 0) when fuse_relu), without im2col.

    For layers with few taps (see _direct_conv.h).  Each (image, output row)
    is one task: its input rows are prepared in the thread's slice of rows,
    then the C kernel computes all output channels of that row.
    """
    cdef Py_ssize_t N = x.shape[0], task
    cdef int OC = weight.shape[0], K = weight.shape[1]
    cdef int OH = g.out_height, OW = g.out_width
    cdef Py_ssize_t P = <Py_ssize_t> OH * OW
    cdef Py_ssize_t row_len = direct_row_length(g)
    cdef Py_ssize_t tap_offset[DIRECT_MAX_TAPS]
    cdef int c, ki, kj, shift, n, oh
    cdef const floating* bias_ptr = &bias[0] if bias.shape[0] > 0 else NULL
    cdef floating* scratch
    for c in range(g.channels):  # tap k = (c, ki, kj) in the weight's order
        for ki in range(g.kernel_h):
            for kj in range(g.kernel_w):
                shift = kj * g.dilation_w
                tap_offset[(c * g.kernel_h + ki) * g.kernel_w + kj] = (
                    ((c * g.kernel_h + ki) * g.stride_w + shift % g.stride_w) * row_len
                    + shift // g.stride_w)
    with nogil:
        for task in prange(N * OH, schedule='dynamic', num_threads=num_threads):
            n = task // OH
            oh = task % OH
            scratch = &rows[threadid(), 0]
            prepare_rows(&x[n, 0, 0, 0], scratch, g, oh, row_len)
            conv_row_direct(&weight[0, 0], bias_ptr, scratch, tap_offset, OC, K, OW,
                            <int> fuse_relu, &out[n, 0, oh, 0], P)


def conv2d_forward(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                   const floating[:, ::1] weight,      # IN  (OC, K), K = (C/groups)*kh*kw
                   const floating[::1] bias,           # IN  (OC,), or empty for no bias
                   floating[:, ::1] cols,              # WORK (threads, K * rows_per_tile * OW)
                   floating[:, :, :, ::1] out,         # OUT (N, OC, OH, OW)
                   Geometry g, int groups, int rows_per_tile, bint fuse_relu, int num_threads):
    """out = weight @ im2col(x) + bias (then max(., 0) when fuse_relu), image by image.

    With groups > 1, input channels [i*C/groups, (i+1)*C/groups) of each image meet
    weight rows [i*OC/groups, (i+1)*OC/groups) only (g.channels is C/groups).
    """
    cdef Py_ssize_t N = x.shape[0]
    cdef int OC = weight.shape[0], K = weight.shape[1], group_oc = OC // groups
    cdef int OW = g.out_width, P = g.out_height * g.out_width
    cdef Py_ssize_t plane = <Py_ssize_t> g.channels * g.height * g.width
    cdef bint has_bias = bias.shape[0] > 0
    cdef Py_ssize_t n, oc, p
    cdef int t, oh0, oh1, slot, grp
    cdef floating* y
    cdef floating* tile
    cdef floating b
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            tile = &cols[slot, 0]
            for grp in range(groups):
                for t in range((g.out_height + rows_per_tile - 1) // rows_per_tile):
                    oh0 = t * rows_per_tile
                    oh1 = min(oh0 + rows_per_tile, g.out_height)
                    im2col(&x[n, 0, 0, 0] + grp * plane, tile, g, oh0, oh1)
                    gemm(False, False, group_oc, (oh1 - oh0) * OW, K, 1,
                         &weight[grp * group_oc, 0], K, tile, (oh1 - oh0) * OW, 0,
                         &out[n, grp * group_oc, oh0, 0], P)
            y = &out[n, 0, 0, 0]
            for oc in range(OC):
                b = bias[oc] if has_bias else 0
                if fuse_relu:
                    for p in range(P):
                        y[oc * P + p] = relu(y[oc * P + p] + b)
                elif has_bias:
                    for p in range(P):
                        y[oc * P + p] += b


def conv2d_backward(const floating[:, :, :, ::1] grad_out,   # IN    (N, OC, OH, OW)
                    const floating[:, :, :, ::1] x,          # IN    (N, C, H, W) the forward input
                    const floating[:, :, :, ::1] out,        # IN    (N, OC, OH, OW) forward output (relu mask)
                    const floating[:, ::1] weight,          # IN    (OC, K)
                    floating[:, ::1] grad_weight,           # INOUT (OC, K), accumulated
                    floating[::1] grad_bias,                # INOUT (OC,), accumulated; empty for no bias
                    floating[:, :, ::1] grad_weight_parts,  # WORK  (N, OC, K)
                    floating[:, ::1] grad_bias_parts,       # WORK  (N, OC)
                    floating[:, ::1] cols,                  # WORK  (threads, K * rows_per_tile * OW)
                    floating[:, ::1] grad_cols,             # WORK  (threads, K * rows_per_tile * OW)
                    floating[:, ::1] masked_grad,           # WORK  (threads, OC * P) when fuse_relu
                    floating[:, :, :, ::1] grad_input,      # OUT   (N, C, H, W); unused without input grad
                    Geometry g, int groups, int rows_per_tile, bint fuse_relu,
                    bint need_input_grad, int num_threads):
    """Accumulate dW += sum_n dY_n @ cols_n^T and db += sum dY; dx = col2im(W^T @ dY_n).

    With fuse_relu, dY is first masked by the forward output's sign (the
    gradient of the fused max(., 0)).  Per image (prange over n) the weight
    and bias gradients go to their own slices of the *_parts workspaces, then
    the slices are summed in image order (prange over output channels): the
    same additions in the same order for any thread count.  Groups as in
    conv2d_forward.
    """
    cdef Py_ssize_t N = grad_out.shape[0]
    cdef int OC = weight.shape[0], K = weight.shape[1], group_oc = OC // groups
    cdef int OW = g.out_width, P = g.out_height * g.out_width
    cdef Py_ssize_t plane = <Py_ssize_t> g.channels * g.height * g.width
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef Py_ssize_t n, sample, oc, k
    cdef int t, oh0, oh1, slot, T, grp
    cdef double bias_sum
    cdef const floating* dy
    cdef const floating* dy_group
    cdef floating* masked
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            dy = &grad_out[n, 0, 0, 0]
            if fuse_relu:
                masked = &masked_grad[slot, 0]
                relu_mask_run(dy, &out[n, 0, 0, 0], masked, <Py_ssize_t> OC * P)
                dy = masked
            if has_bias:
                for oc in range(OC):
                    grad_bias_parts[n, oc] = <floating> sum_run(dy + oc * P, P)
            if need_input_grad:
                memset(&grad_input[n, 0, 0, 0], 0, groups * plane * sizeof(floating))
            for grp in range(groups):
                dy_group = dy + <Py_ssize_t> grp * group_oc * P
                for t in range((g.out_height + rows_per_tile - 1) // rows_per_tile):
                    oh0 = t * rows_per_tile
                    oh1 = min(oh0 + rows_per_tile, g.out_height)
                    T = (oh1 - oh0) * OW
                    im2col(&x[n, 0, 0, 0] + grp * plane, &cols[slot, 0], g, oh0, oh1)
                    gemm(False, True, group_oc, K, T, 1, dy_group + oh0 * OW, P, &cols[slot, 0],
                         T, 0 if oh0 == 0 else 1, &grad_weight_parts[n, grp * group_oc, 0], K)
                    if need_input_grad:
                        gemm(True, False, K, T, group_oc, 1, &weight[grp * group_oc, 0], K,
                             dy_group + oh0 * OW, P, 0, &grad_cols[slot, 0], T)
                        col2im(&grad_cols[slot, 0], &grad_input[n, 0, 0, 0] + grp * plane, g,
                               oh0, oh1)
        for oc in prange(OC, schedule='dynamic', num_threads=num_threads):
            for sample in range(N):
                for k in range(K):
                    grad_weight[oc, k] += grad_weight_parts[sample, oc, k]
            if has_bias:
                bias_sum = 0
                for sample in range(N):
                    # not "+=": in a prange that would make it a reduction variable
                    bias_sum = bias_sum + grad_bias_parts[sample, oc]
                grad_bias[oc] += <floating> bias_sum
