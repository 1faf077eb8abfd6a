"""3x3 stride-1 convolutions by Winograd F(4x4, 3x3): forward, input gradient, weight gradient.

Layouts (row-major, C-contiguous; see _winograd.h for the transforms):
    x            (N, C, H, W)        input batch
    weight       (M, C, 3, 3)        M output channels
    out          (N, M, OH, OW)      OH = H + 2*pad_h - 2, likewise OW
    tiles        TH = ceil(OH / 4) by TW = ceil(OW / 4) 4x4 output tiles per image,
                 numbered over the batch: t = (n*TH + th)*TW + tw
    packed       (36, Mp*C + PAD)    the transformed weight, position by position an
                                     (Mp, C) matrix, Mp = M rounded up to CHANNEL_BLOCK, in
                                     row blocks of CHANNEL_BLOCK channels; PAD =
                                     POSITION_PAD elements past each position (also in
                                     the weight gradient's dw), so that the filter
                                     transforms' 36 streams do not share a cache set

Forward (winograd_forward): the batch's tiles are cut into ranges of tile_range
tiles (fixed by the shapes, a multiple of TILE_BLOCK); each range is one task.
A task transforms its input patches into the thread's (36, C, tile_range) block,
multiplies each of the 36 positions by the packed weight into its (36, Mp,
tile_range) block, and transforms those back into output tiles.  Every output
is written by one task, in an order fixed by the shapes: results do not depend
on the thread count.  The input gradient is the same computation on the output
gradient, with the weight transposed and flipped and padding 2 - pad.

Weight gradient (winograd_weight_grad): per range of tiles (in order), the
transformed input (36, C, range) and output gradient (36, M, range) are made
in shared blocks (one channel per task), then each position's task adds its
matrix product over the range (one single-threaded BLAS call) to that
position's (M, C) gradient of the transformed weight.  Thin layers, whose
products are too small for BLAS to pay, take cyconv's own product instead,
which keeps each element as partial sums over lanes of tiles (in lanes) and adds
them up after the last range.  Each element of that sum is owned by one task
and the ranges are taken in order, so the additions happen in the same order
for any thread count.  Last, each filter's gradient is transformed back and
added to grad_weight.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memset

from cyconv._blas cimport gemm
from cyconv._reduce cimport sum_run
from cyconv._vectors cimport set_vector_width

cdef extern from "_winograd.h" nogil:
    enum: WINOGRAD_TILE
    enum: WINOGRAD_POSITIONS
    enum: WINOGRAD_TILE_BLOCK
    enum: WINOGRAD_CHANNEL_BLOCK
    enum: WINOGRAD_ROW_SLACK
    enum: WINOGRAD_GATHER_SIZE
    enum: WINOGRAD_GRAD_LANE_BYTES
    enum: WINOGRAD_POSITION_PAD
    # C kernels with a float and a double version, one name each (see _typed.h and
    # _winograd_tiles.h / _winograd_filters.h for the arguments)
    void winograd_transform(...)
    void winograd_output(...)
    void winograd_filters(...)
    void winograd_filter_grads(...)
    void winograd_product(...)
    void winograd_grad_lanes(...)
    void winograd_grad_lanes_sum(...)

TILE = WINOGRAD_TILE
POSITIONS = WINOGRAD_POSITIONS
TILE_BLOCK = WINOGRAD_TILE_BLOCK
CHANNEL_BLOCK = WINOGRAD_CHANNEL_BLOCK
ROW_SLACK = WINOGRAD_ROW_SLACK
GATHER_SIZE = WINOGRAD_GATHER_SIZE
GRAD_LANE_BYTES = WINOGRAD_GRAD_LANE_BYTES
POSITION_PAD = WINOGRAD_POSITION_PAD


def force_vector_width(width):
    """Run the kernels with vectors of width bytes (32 or 64), or as the CPU suits
    (None): for the tests, which check that both widths give the same bits."""
    set_vector_width(width, "_winograd")


cdef inline Py_ssize_t position_stride(int rows, Py_ssize_t T) noexcept nogil:
    """Elements from one position to the next in a (36, rows, T) block of transformed
    tiles: padded, so that the 36 positions do not fall on the same cache sets."""
    return rows * T + WINOGRAD_POSITION_PAD


cdef inline int tiles_across(int size) noexcept nogil:
    """Tiles along an output side of size outputs."""
    return (size + WINOGRAD_TILE - 1) // WINOGRAD_TILE


cdef void pack_filters(const floating[:, :, :, ::1] weight, bint transposed, int block,
                       floating[:, ::1] packed) noexcept nogil:
    """packed[:, row block, :] <- the transforms of the filters of output channels
    [CHANNEL_BLOCK * block, + CHANNEL_BLOCK) (zeros for the padding channels >= M).

    weight is (M, C, 3, 3), or (C, M, 3, 3) read transposed and flipped.
    """
    cdef int C = weight.shape[0] if transposed else weight.shape[1]
    cdef int M = weight.shape[1] if transposed else weight.shape[0]
    cdef int m = block * WINOGRAD_CHANNEL_BLOCK, count = min(WINOGRAD_CHANNEL_BLOCK, M - m)
    cdef Py_ssize_t xi_stride = packed.shape[1]
    cdef Py_ssize_t filter_stride = 9 if transposed else <Py_ssize_t> C * 9
    cdef int c
    for c in range(C):
        winograd_filters(&weight[c, min(m, M - 1), 0, 0] if transposed
                         else &weight[min(m, M - 1), c, 0, 0],
                         filter_stride, count, transposed,
                         &packed[0, 0] + (block * C + c) * WINOGRAD_CHANNEL_BLOCK, xi_stride)


cdef void forward_range(const floating* x, const floating* mask, const floating* packed,
                        Py_ssize_t packed_stride, const floating* bias, floating* v,
                        floating* y, floating* taps, floating* out, int C, int M, int Mp, int H,
                        int W, int OH, int OW, int pad_h, int pad_w, Py_ssize_t t0,
                        Py_ssize_t t1, Py_ssize_t T, int activation) noexcept nogil:
    """out's tiles [t0, t1) <- packed (positions packed_stride apart) * transformed x,
    through v (36, C, T) and y (36, Mp, T) (taps: the transforms' workspace)."""
    cdef int TH = tiles_across(OH), TW = tiles_across(OW), c, m, xi
    cdef Py_ssize_t plane = <Py_ssize_t> H * W, out_plane = <Py_ssize_t> OH * OW
    cdef Py_ssize_t v_stride = position_stride(C, T), y_stride = position_stride(Mp, T)
    for c in range(C):
        winograd_transform(x + c * plane, mask + c * plane if mask != NULL else NULL, C * plane,
                           H, W, pad_h, pad_w, TH, TW, t0, t1, T, False, taps, v + c * T,
                           v_stride)
    for xi in range(WINOGRAD_POSITIONS):
        winograd_product(packed + xi * packed_stride, v + xi * v_stride, T, Mp, C, T,
                         y + xi * y_stride, T)
    for m in range(M):
        winograd_output(y + m * T, y_stride, bias[m] if bias != NULL else 0, activation, OH, OW, TH,
                        TW, t0, t1, taps, out + m * out_plane, M * out_plane)


def winograd_forward(const floating[:, :, :, ::1] x,       # IN   (N, C, H, W)
                     const floating[:, :, :, ::1] mask,    # IN   like x, or empty: x is read as 0 where mask <= 0
                     const floating[:, :, :, ::1] weight,  # IN   (M, C, 3, 3), or (C, M, 3, 3) when transposed
                     const floating[::1] bias,             # IN   (M,), or empty for no bias
                     floating[:, ::1] packed,              # WORK (36, Mp*C + POSITION_PAD)
                     floating[:, ::1] v,                   # WORK (threads, 36 * (C * tile_range + POSITION_PAD))
                     floating[:, ::1] y,                   # WORK (threads, 36 * (Mp * tile_range + POSITION_PAD) + ROW_SLACK)
                     floating[:, ::1] taps,                # WORK (threads, GATHER_SIZE)
                     floating[:, :, :, ::1] out,           # OUT  (N, M, OH, OW)
                     int pad_h, int pad_w, bint transposed, Py_ssize_t tile_range,
                     int activation, int num_threads):
    """out = conv3x3(x, weight, padding) + bias, then the activation of that code (see
    _elementwise.pxd; 0: none).

    transposed: weight is (C, M, 3, 3) and is used transposed and flipped, which
    makes this the input gradient of a convolution whose output gradient is x
    (with padding 2 - its padding).
    """
    cdef int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef int M = out.shape[1], OH = out.shape[2], OW = out.shape[3]
    cdef int blocks = (M + WINOGRAD_CHANNEL_BLOCK - 1) // WINOGRAD_CHANNEL_BLOCK
    cdef int Mp = blocks * WINOGRAD_CHANNEL_BLOCK
    cdef Py_ssize_t tiles = <Py_ssize_t> N * tiles_across(OH) * tiles_across(OW)
    cdef Py_ssize_t task, t0
    cdef int block, slot
    cdef const floating* mask_ptr = &mask[0, 0, 0, 0] if mask.shape[0] > 0 else NULL
    cdef const floating* bias_ptr = &bias[0] if bias.shape[0] > 0 else NULL
    with nogil, parallel(num_threads=num_threads):
        for block in prange(blocks, schedule='static'):
            pack_filters(weight, transposed, block, packed)
        for task in prange((tiles + tile_range - 1) // tile_range, schedule='dynamic'):
            slot = threadid()
            t0 = task * tile_range
            forward_range(&x[0, 0, 0, 0], mask_ptr, &packed[0, 0], packed.shape[1], bias_ptr,
                          &v[slot, 0], &y[slot, 0], &taps[slot, 0], &out[0, 0, 0, 0], C, M, Mp,
                          H, W, OH, OW, pad_h, pad_w, t0, min(t0 + tile_range, tiles),
                          tile_range, activation)


cdef void transform_for_grad(const floating* x, const floating* grad_out, const floating* mask,
                             floating* v, floating* d, floating* taps, int j, int C, int M,
                             int H, int W, int OH, int OW, int pad_h, int pad_w,
                             Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t T) noexcept nogil:
    """Row j of the weight gradient's operands for tiles [t0, t1): j < C is input channel j
    (into v, (36, C, T)), else output channel j - C of the (masked) output gradient
    (into d, (36, M, T))."""
    cdef int TH = tiles_across(OH), TW = tiles_across(OW)
    cdef Py_ssize_t plane = <Py_ssize_t> H * W, out_plane = <Py_ssize_t> OH * OW
    if j < C:
        winograd_transform(x + j * plane, NULL, C * plane, H, W, pad_h, pad_w, TH, TW, t0, t1,
                           T, False, taps, v + j * T, position_stride(C, T))
    else:
        j -= C
        winograd_transform(grad_out + j * out_plane,
                           mask + j * out_plane if mask != NULL else NULL, M * out_plane, OH, OW,
                           0, 0, TH, TW, t0, t1, T, True, taps, d + j * T, position_stride(M, T))


cdef void grad_product(const floating* v, const floating* d, floating* dw, Py_ssize_t dw_stride,
                       floating* lanes, double* bias_sums, int xi, int C, int M,
                       Py_ssize_t T) noexcept nogil:
    """dw (36, M, C; positions dw_stride apart) at position xi += d @ v^T over the T tiles
    (one BLAS call), or, with lanes given, its partial sums in lanes (36, M, C, GRAD_LANES)
    (see _winograd_filters.h).
    Position 7 of d ((A y A^T)[1][1], A's row 1 all ones) is the sum of each tile's output
    gradient, so that task also adds those to bias_sums."""
    cdef const floating* a = d + xi * position_stride(M, T)
    cdef const floating* b = v + xi * position_stride(C, T)
    cdef Py_ssize_t elements = <Py_ssize_t> M * C
    cdef int m
    if lanes != NULL:
        winograd_grad_lanes(a, b, M, C, T,
                            lanes + xi * elements * (WINOGRAD_GRAD_LANE_BYTES // sizeof(floating)))
    else:
        gemm(False, True, M, C, <int> T, 1, a, <int> T, b, <int> T, 1,
             dw + xi * dw_stride, C)
    if xi == 7:
        for m in range(M):
            bias_sums[m] += sum_run(a + m * T, T)


cdef void unpack_filter_grads(const floating[:, ::1] dw, int m, int C,
                              floating[:, :, :, ::1] grad_weight) noexcept nogil:
    """grad_weight[m] += the gradients of output channel m's filters, from those of their
    transforms: row m of each position's (M, C) matrix in dw (CHANNEL_BLOCK input channels
    at a time)."""
    cdef int block, c
    for block in range((C + WINOGRAD_CHANNEL_BLOCK - 1) // WINOGRAD_CHANNEL_BLOCK):
        c = block * WINOGRAD_CHANNEL_BLOCK
        winograd_filter_grads(&dw[0, m * C + c], dw.shape[1],
                              min(WINOGRAD_CHANNEL_BLOCK, C - c), &grad_weight[m, c, 0, 0], 9)


def winograd_weight_grad(const floating[:, :, :, ::1] grad_out,  # IN    (N, M, OH, OW)
                         const floating[:, :, :, ::1] x,         # IN    (N, C, H, W)
                         const floating[:, :, :, ::1] out,       # IN    (N, M, OH, OW) relu mask, or empty
                         floating[:, :, :, ::1] grad_weight,     # INOUT (M, C, 3, 3), accumulated
                         floating[::1] grad_bias,                # INOUT (M,), accumulated; empty for no bias
                         floating[::1] v,                        # WORK  (36 * (C * tile_range + POSITION_PAD))
                         floating[::1] d,                        # WORK  (36 * (M * tile_range + POSITION_PAD))
                         floating[:, ::1] dw,                    # WORK  (36, M*C + POSITION_PAD)
                         floating[::1] lanes,                    # WORK  (36 * M * C * GRAD_LANES), or empty
                         double[::1] bias_sums,                  # WORK  (M,)
                         floating[:, ::1] taps,                  # WORK  (threads, GATHER_SIZE)
                         int pad_h, int pad_w, Py_ssize_t tile_range, int num_threads):
    """grad_weight += the gradient of sum(grad_out * conv3x3(x, weight)); grad_bias += sum
    of grad_out over (N, OH, OW).  With out given, grad_out counts only where out > 0 (the
    gradient through a fused ReLU).  The products are one task per position: one
    single-threaded BLAS call per position and range, or with lanes given (thin layers),
    cyconv's own product, whose partial sums are added up at the end."""
    cdef int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef int M = grad_out.shape[1], OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef int j, xi, m, c
    cdef Py_ssize_t tiles = <Py_ssize_t> N * tiles_across(OH) * tiles_across(OW)
    cdef Py_ssize_t chunk, t0
    cdef const floating* mask_ptr = &out[0, 0, 0, 0] if out.shape[0] > 0 else NULL
    cdef floating* lanes_ptr = &lanes[0] if lanes.shape[0] > 0 else NULL
    cdef Py_ssize_t elements = <Py_ssize_t> M * C
    memset(&dw[0, 0], 0, dw.shape[0] * dw.shape[1] * sizeof(floating))
    if lanes_ptr != NULL:
        memset(lanes_ptr, 0, lanes.shape[0] * sizeof(floating))
    memset(&bias_sums[0], 0, M * sizeof(double))
    with nogil, parallel(num_threads=num_threads):
        for chunk in range((tiles + tile_range - 1) // tile_range):
            t0 = chunk * tile_range
            for j in prange(C + M, schedule='dynamic'):
                transform_for_grad(&x[0, 0, 0, 0], &grad_out[0, 0, 0, 0], mask_ptr, &v[0], &d[0],
                                   &taps[threadid(), 0], j, C, M, H, W, OH, OW, pad_h, pad_w,
                                   t0, min(t0 + tile_range, tiles), tile_range)
            for xi in prange(WINOGRAD_POSITIONS, schedule='dynamic'):
                grad_product(&v[0], &d[0], &dw[0, 0], dw.shape[1], lanes_ptr, &bias_sums[0],
                             xi, C, M, tile_range)
        if lanes_ptr != NULL:
            for xi in prange(WINOGRAD_POSITIONS, schedule='static'):
                winograd_grad_lanes_sum(lanes_ptr + xi * (lanes.shape[0] // WINOGRAD_POSITIONS),
                                        elements, &dw[xi, 0])
        for m in prange(M, schedule='static'):
            unpack_filter_grads(dw, m, C, grad_weight)
            if grad_bias.shape[0] > 0:
                grad_bias[m] += <floating> bias_sums[m]
