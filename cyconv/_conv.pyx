"""2-D convolution kernels: im2col + GEMM forward, GEMM + col2im backward (the direct
forward kernel for layers with few taps is in _conv_direct.pyx, depthwise layers'
kernels in _depthwise.pyx).

Layouts (row-major, C-contiguous):
    x            (N, C, H, W)        input batch
    weight       (OC, K)             the (OC, C, kh, kw) weight viewed flat, K = C*kh*kw
    out          (N, OC, OH, OW)     P = OH*OW output pixels per channel
    cols         (threads, K*T)      one im2col tile per thread, T = rows_per_tile*OW

The forward splits the batch across threads (prange over n).  Each image is
processed in tiles of whole output rows, small enough (see rows_per_tile in
nn/conv.py) that a tile's columns stay in the core's cache between im2col and
the matrix product; the columns are never stored for the whole batch: backward
rebuilds them tile by tile.  Every thread multiplies with single-threaded BLAS
calls and no two threads write the same output element.  Backward splits the
work into items by chunks of images and blocks of K instead (the weight
gradient is a sum over images: see conv2d_backward).  Tiles and items are fixed
by the shapes alone, so results do not depend on the thread count.  A pointwise
layer (1x1, stride 1, no padding) reads the image in place of its columns and
writes its input gradient straight into the image's rows; a 1x1 layer of stride
> 1 without padding runs as a pointwise one on the pixels it reads, gathered
first (subsample_forward).  Work is
dealt out one image or item at a time (schedule 'dynamic'), so a thread that
loses its core to another process does not hold the others up.  Backward never
inserts zeros for strides: col2im scatters each column entry back onto the
input pixel it was read from.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memset

from cyconv._blas cimport gemm
from cyconv._elementwise cimport activate, relu_mask_run
from cyconv._reduce cimport sum_run

# a C kernel with a float and a double version, one name (see _typed.h)
cdef extern from "_row_loops.h" nogil:
    void scatter_add_stride2(...)   # (T* dst, const T* src, n): dst[2*i] += src[i], i < n


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
                 int oh0, int oh1, int k0, int k1) noexcept nogil:
    """cols (k1 - k0, T) <- rows [k0, k1) of the receptive fields of output rows [oh0, oh1)
    of one image (C, H, W).

    T = (oh1 - oh0) * OW.  Row k = (c, ki, kj) (that is, (c*kh + ki)*kw + kj)
    holds, for each output pixel (oh, ow), the input pixel (oh*sh - ph + ki*dh,
    ow*sw - pw + kj*dw), or 0 where that falls in the padding.
    """
    cdef int k, c, ki, kj, oh, ow, ih, off_h, off_w, taps = g.kernel_h * g.kernel_w
    cdef int oh_lo, oh_hi, ow_lo, ow_hi
    cdef int OW = g.out_width
    cdef Py_ssize_t T = <Py_ssize_t> (oh1 - oh0) * OW
    cdef floating* dst
    cdef const floating* src
    for c in range(k0 // taps, (k1 + taps - 1) // taps):
        for ki in range(g.kernel_h):
            off_h = ki * g.dilation_h - g.pad_h
            valid_range(off_h, g.stride_h, g.height, g.out_height, &oh_lo, &oh_hi)
            for kj in range(g.kernel_w):
                k = (c * g.kernel_h + ki) * g.kernel_w + kj
                if k < k0 or k >= k1:
                    continue
                off_w = kj * g.dilation_w - g.pad_w
                valid_range(off_w, g.stride_w, g.width, OW, &ow_lo, &ow_hi)
                for oh in range(oh0, oh1):
                    dst = cols + (k - k0) * T + (oh - oh0) * OW
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


cdef inline bint is_pointwise(Geometry g) noexcept nogil:
    """1x1 kernel, stride 1, no padding: an image (C, H*W) is its own im2col."""
    return (g.kernel_h == 1 and g.kernel_w == 1 and g.stride_h == 1 and g.stride_w == 1
            and g.pad_h == 0 and g.pad_w == 0)


def pointwise(Geometry g):
    """True when the kernels read the image itself as its im2col columns (no tile)."""
    return is_pointwise(g)


cdef inline int columns_stride(Geometry g, int oh0, int oh1) noexcept nogil:
    """The row stride of the columns that columns() gives for output rows [oh0, oh1)."""
    return g.out_height * g.out_width if is_pointwise(g) else (oh1 - oh0) * g.out_width


cdef const floating* columns(const floating* image, floating* tile, Geometry g, int oh0,
                             int oh1, int k0, int k1) noexcept nogil:
    """Rows [k0, k1) of the im2col columns of output rows [oh0, oh1), row stride
    columns_stride(): built in tile, or for a pointwise layer read from the image in place.
    (The stride is not returned through a pointer: inside a prange, a variable assigned
    only through a pointer would be shared by the threads.)"""
    if is_pointwise(g):
        return image + <Py_ssize_t> k0 * g.out_height * g.out_width + oh0 * g.out_width
    im2col(image, tile, g, oh0, oh1, k0, k1)
    return tile


cdef void finish_rows(floating* y, const floating[::1] bias, int oc0, int channels,
                      Py_ssize_t plane, Py_ssize_t count, int activation) noexcept nogil:
    """y[oc * plane + p] = activation(y[oc * plane + p] + bias[oc0 + oc]) for oc < channels,
    p < count: the bias (none when bias is empty) and activation (0: none) of the output
    rows a tile's product just wrote, while they are in the cache."""
    cdef bint has_bias = bias.shape[0] > 0
    cdef Py_ssize_t oc, p
    cdef floating b
    cdef floating* row
    for oc in range(channels):
        b = bias[oc0 + oc] if has_bias else 0
        row = y + oc * plane
        if activation:
            for p in range(count):
                row[p] = activate(row[p] + b, activation)
        elif has_bias:
            for p in range(count):
                row[p] += b


def conv2d_forward(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                   const floating[:, ::1] weight,      # IN  (OC, K), K = (C/groups)*kh*kw
                   const floating[::1] bias,           # IN  (OC,), or empty for no bias
                   floating[:, ::1] cols,              # WORK (threads, K * rows_per_tile * OW)
                   floating[:, :, :, ::1] out,         # OUT (N, OC, OH, OW)
                   Geometry g, int groups, int rows_per_tile, int activation, int num_threads):
    """out = weight @ im2col(x) + bias, then the activation of that code (see
    _elementwise.pxd; 0: none), image by image, tile by tile.

    With groups > 1, input channels [i*C/groups, (i+1)*C/groups) of each image meet
    weight rows [i*OC/groups, (i+1)*OC/groups) only (g.channels is C/groups).
    """
    cdef Py_ssize_t N = x.shape[0]
    cdef int OC = weight.shape[0], K = weight.shape[1], group_oc = OC // groups
    cdef int OW = g.out_width, P = g.out_height * g.out_width
    cdef Py_ssize_t plane = <Py_ssize_t> g.channels * g.height * g.width
    cdef Py_ssize_t n
    cdef int t, oh0, oh1, slot, grp, ld
    cdef floating* tile
    cdef const floating* cols_tile
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            tile = &cols[slot, 0]
            for grp in range(groups):
                for t in range((g.out_height + rows_per_tile - 1) // rows_per_tile):
                    oh0 = t * rows_per_tile
                    oh1 = min(oh0 + rows_per_tile, g.out_height)
                    cols_tile = columns(&x[n, 0, 0, 0] + grp * plane, tile, g, oh0, oh1, 0, K)
                    ld = columns_stride(g, oh0, oh1)
                    gemm(False, False, group_oc, (oh1 - oh0) * OW, K, 1,
                         &weight[grp * group_oc, 0], K, cols_tile, ld, 0,
                         &out[n, grp * group_oc, oh0, 0], P)
                    finish_rows(&out[n, grp * group_oc, oh0, 0], bias, grp * group_oc,
                                group_oc, P, (oh1 - oh0) * OW, activation)


cdef void weight_grad_tile(const floating* dy, const floating* image, floating* tile,
                           floating* target, int ldt, bint transposed, Geometry g, int group_oc,
                           int k0, int k1, int oh0, int oh1, bint overwrite) noexcept nogil:
    """target (group_oc, k1 - k0), row stride ldt, += (= when overwrite) dy @ cols^T for
    output rows [oh0, oh1): cols are rows [k0, k1) of their im2col, dy (group_oc, P).
    transposed: target is (k1 - k0, group_oc) and gets cols @ dy^T instead (see
    conv2d_backward)."""
    cdef int P = g.out_height * g.out_width, T = (oh1 - oh0) * g.out_width
    cdef const floating* cols = columns(image, tile, g, oh0, oh1, k0, k1)
    cdef int ldc = columns_stride(g, oh0, oh1)
    if transposed:
        gemm(False, True, k1 - k0, group_oc, T, 1, cols, ldc, dy + oh0 * g.out_width, P,
             0 if overwrite else 1, target, ldt)
    else:
        gemm(False, True, group_oc, k1 - k0, T, 1, dy + oh0 * g.out_width, P, cols, ldc,
             0 if overwrite else 1, target, ldt)


cdef void input_grad_tile(const floating* dy, const floating* weight, floating* tile,
                          floating* image_grad, Geometry g, int group_oc, int K, int oh0,
                          int oh1) noexcept nogil:
    """image_grad (channels, H, W) += col2im(weight^T @ dy) for output rows [oh0, oh1),
    weight (group_oc, K), dy (group_oc, P); for a pointwise layer, = weight^T @ dy straight
    into those rows of image_grad (each input pixel is read by one output pixel)."""
    cdef int P = g.out_height * g.out_width, T = (oh1 - oh0) * g.out_width
    if is_pointwise(g):
        gemm(True, False, K, T, group_oc, 1, weight, K, dy + oh0 * g.out_width, P, 0,
             image_grad + oh0 * g.out_width, P)
        return
    gemm(True, False, K, T, group_oc, 1, weight, K, dy + oh0 * g.out_width, P, 0, tile, T)
    col2im(tile, image_grad, g, oh0, oh1)


cdef void image_backward(const floating* dy, const floating* image, const floating* weight,
                         floating* cols, floating* grad_cols, floating* target, int ldt,
                         bint transposed, floating* image_grad, Geometry g, int group_oc, int K,
                         int k0, int k1, int weight_rows, int input_rows,
                         bint overwrite) noexcept nogil:
    """One image's part of a backward item: target (row stride ldt; transposed as in
    weight_grad_tile) += (= when overwrite) its weight gradient of rows [k0, k1), and
    image_grad (NULL: not wanted) = its input gradient, tile by tile.  When both take
    the same tiles (one block of K), each tile of dy is used by both while it is in
    the cache."""
    cdef int t, oh0
    cdef bint together = image_grad != NULL and weight_rows == input_rows
    if image_grad != NULL and not is_pointwise(g):   # (pointwise tiles write it all)
        memset(image_grad, 0, <Py_ssize_t> g.channels * g.height * g.width * sizeof(floating))
    for t in range((g.out_height + weight_rows - 1) // weight_rows):
        oh0 = t * weight_rows
        weight_grad_tile(dy, image, cols, target, ldt, transposed, g, group_oc, k0, k1, oh0,
                         min(oh0 + weight_rows, g.out_height), overwrite and t == 0)
        if together:
            input_grad_tile(dy, weight, grad_cols, image_grad, g, group_oc, K, oh0,
                            min(oh0 + weight_rows, g.out_height))
    if image_grad != NULL and not together:
        for t in range((g.out_height + input_rows - 1) // input_rows):
            oh0 = t * input_rows
            input_grad_tile(dy, weight, grad_cols, image_grad, g, group_oc, K, oh0,
                            min(oh0 + input_rows, g.out_height))


cdef inline void add_sum(const double* values, int count, int stride,
                         floating* total) noexcept nogil:
    """total[0] += sum_i values[i * stride], i < count, summed in order in double."""
    cdef double s = 0
    cdef int i
    for i in range(count):
        s += values[i * stride]
    total[0] += <floating> s


def conv2d_backward(const floating[:, :, :, ::1] grad_out,   # IN    (N, OC, OH, OW)
                    const floating[:, :, :, ::1] x,          # IN    (N, C, H, W) the forward input
                    const floating[:, :, :, ::1] out,        # IN    (N, OC, OH, OW) forward output (relu mask)
                    const floating[:, ::1] weight,          # IN    (OC, K)
                    floating[:, ::1] grad_weight,           # INOUT (OC, K), accumulated
                    floating[::1] grad_bias,                # INOUT (OC,), accumulated; empty for no bias
                    floating[:, :, ::1] parts,              # WORK  (chunks, OC, K); (chunks, K, OC) when transposed; unused for 1 chunk otherwise
                    double[:, ::1] bias_parts,              # WORK  (chunks, OC); empty for no bias
                    floating[:, ::1] cols,                  # WORK  (threads, ceil(K/blocks) * weight_rows * OW)
                    floating[:, ::1] grad_cols,             # WORK  (threads, K * input_rows * OW)
                    floating[:, ::1] masked_grad,           # WORK  (threads, OC/groups * P) when fuse_relu
                    floating[:, :, :, ::1] grad_input,      # OUT   (N, C, H, W); unused without input grad
                    Geometry g, int groups, int weight_rows, int input_rows, int blocks,
                    int chunks, bint transposed, bint fuse_relu, bint need_input_grad,
                    int num_threads):
    """dW += sum_n dY_n @ im2col(x_n)^T, db += sum dY, dx_n = col2im(W^T @ dY_n).

    With fuse_relu, dY is first masked by the forward output's sign (the
    gradient of the fused max(., 0)).  The work is split into items (prange)
    that write disjoint outputs: item (grp, j, b) takes the images of the j-th
    of `chunks` chunks of the batch and the b-th of `blocks` blocks of K; per
    image it builds only that block's im2col rows, and it sums the images in
    order, straight into its block of grad_weight for one chunk, else into its
    block of parts[j]; the b == 0 items sum the bias gradient into
    bias_parts[j].  The parts are then added in chunk order (prange over
    output channels).  transposed: every item computes its block transposed,
    im2col(x_n) @ dY_n^T, into parts[j] (K, OC), even for one chunk; the parts
    are summed in chunk order into parts[0], which is added to grad_weight
    transposed back (BLAS multiplies faster with the longer of OC and K as the
    product's rows: nn/conv.py chooses).  The split follows from the shapes
    alone, so every sum is the same for any thread count.  The input gradient
    of image n is computed by the item of its chunk with b == n % blocks.
    Groups as in conv2d_forward, one item per group and (j, b).
    """
    cdef Py_ssize_t N = grad_out.shape[0], n, item, oc, k
    cdef int OC = weight.shape[0], K = weight.shape[1], group_oc = OC // groups
    cdef int P = g.out_height * g.out_width, block = (K + blocks - 1) // blocks
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef int grp, j, b, k0, k1, slot, first, i
    cdef floating* target
    cdef const floating* dy
    if N == 0:   # no image: nothing to add (and the parts would never be written)
        return
    with nogil:
        for item in prange(groups * chunks * blocks, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            grp = item // (chunks * blocks)
            j = item // blocks % chunks
            b = item % blocks
            k0 = b * block
            k1 = min(k0 + block, K)
            if transposed:
                target = &parts[j, k0, grp * group_oc]
            elif chunks > 1:
                target = &parts[j, grp * group_oc, k0]
            else:
                target = &grad_weight[grp * group_oc, k0]
            first = j * N // chunks
            if has_bias and b == 0:
                for i in range(group_oc):
                    bias_parts[j, grp * group_oc + i] = 0
            for n in range(first, (j + 1) * N // chunks):
                dy = &grad_out[n, grp * group_oc, 0, 0]
                if fuse_relu:
                    relu_mask_run(dy, &out[n, grp * group_oc, 0, 0], &masked_grad[slot, 0],
                                  <Py_ssize_t> group_oc * P)
                    dy = &masked_grad[slot, 0]
                if has_bias and b == 0:
                    for i in range(group_oc):
                        bias_parts[j, grp * group_oc + i] += sum_run(dy + <Py_ssize_t> i * P, P)
                image_backward(dy, &x[n, grp * g.channels, 0, 0], &weight[grp * group_oc, 0],
                               &cols[slot, 0], &grad_cols[slot, 0] if need_input_grad else NULL,
                               target, OC if transposed else K, transposed,
                               &grad_input[n, grp * g.channels, 0, 0]
                               if need_input_grad and n % blocks == b else NULL,
                               g, group_oc, K, k0, k1, weight_rows, input_rows,
                               (transposed or chunks > 1) and n == first)
        if transposed:   # the parts summed along their rows, then added as grad_weight's columns
            for k in prange(K, schedule='static', num_threads=num_threads):
                for j in range(1, chunks):
                    for oc in range(OC):
                        parts[0, k, oc] += parts[j, k, oc]
                for oc in range(OC):
                    grad_weight[oc, k] += parts[0, k, oc]
        for oc in prange(OC, schedule='static', num_threads=num_threads):
            for j in range(chunks if chunks > 1 and not transposed else 0):
                for k in range(K):
                    grad_weight[oc, k] += parts[j, oc, k]
            if has_bias:
                add_sum(&bias_parts[0, oc], chunks, OC, &grad_bias[oc])


def subsample_forward(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                      floating[:, :, :, ::1] out,       # OUT (N, C, OH, OW)
                      int stride_h, int stride_w, int num_threads):
    """out[n, c, i, j] = x[n, c, i*stride_h, j*stride_w]: the pixels a 1x1 convolution of
    that stride (without padding) reads, which it then multiplies as a pointwise one."""
    cdef Py_ssize_t planes = <Py_ssize_t> x.shape[0] * x.shape[1], plane
    cdef int C = x.shape[1], OH = out.shape[2], OW = out.shape[3], i
    with nogil:
        for plane in prange(planes, schedule='static', num_threads=num_threads):
            for i in range(OH):
                gather_strided(&out[plane // C, plane % C, i, 0],
                               &x[plane // C, plane % C, i * stride_h, 0], OW, stride_w)


def subsample_backward(const floating[:, :, :, ::1] grad_out,  # IN  (N, C, OH, OW)
                       floating[:, :, :, ::1] grad_x,          # OUT (N, C, H, W)
                       int stride_h, int stride_w, int num_threads):
    """grad_x = the gradient of subsample_forward: grad_out at the pixels it read, 0
    elsewhere."""
    cdef Py_ssize_t planes = <Py_ssize_t> grad_x.shape[0] * grad_x.shape[1], plane
    cdef int C = grad_x.shape[1], OH = grad_out.shape[2], OW = grad_out.shape[3], i, j
    cdef Py_ssize_t plane_size = <Py_ssize_t> grad_x.shape[2] * grad_x.shape[3]
    cdef floating* row
    with nogil:
        for plane in prange(planes, schedule='static', num_threads=num_threads):
            memset(&grad_x[plane // C, plane % C, 0, 0], 0, plane_size * sizeof(floating))
            for i in range(OH):
                row = &grad_x[plane // C, plane % C, i * stride_h, 0]
                for j in range(OW):
                    row[j * stride_w] = grad_out[plane // C, plane % C, i, j]
