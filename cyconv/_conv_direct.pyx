"""The direct forward kernel of 2-D convolution, for layers with few taps (K = C*kh*kw,
e.g. an RGB input layer) or moderately many over wide output rows (nn/conv.py chooses),
where im2col + GEMM copies more than it gains; K <= MAX_DIRECT_TAPS.  Also the weight
gradient of such a layer when its input gradient is not wanted
(conv2d_weight_grad_direct).

Layouts as in _conv.pyx.  conv2d_forward_direct (its C kernel: _direct_conv.h) takes
one (image, band of output rows) per task: the input rows the band reads are
copied into the thread's workspace once (each is read by up to kh output rows),
split by stride phase so that every tap is a contiguous run, and all output
channels of each row are accumulated in vector registers.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from cyconv._conv cimport Geometry, gather_strided, valid_range
from cyconv._direct_conv cimport (DIRECT_COLUMNS, DIRECT_MAX_TAPS, DIRECT_VECTORIZED,
                                  conv_row_direct)
from cyconv._elementwise cimport relu_mask_run
from cyconv._reduce cimport sum_run
from cyconv._vectors cimport set_vector_width


cdef extern from "_direct_weight_grad.h" nogil:
    enum: WEIGHT_GRAD_VECTOR_BYTES
    # float and double versions, one name (see _typed.h): (const T* dy, Py_ssize_t ldy,
    # int count, const T* rows, Py_ssize_t rows_stride, const Py_ssize_t* tap_offset,
    # int OC, int K, int OW, T* lanes)
    void conv_rows_weight_grad(...)


# conv2d_weight_grad_direct takes bands of this many output rows: the kernel keeps its
# sums in registers over a band
WEIGHT_GRAD_BAND = 4


# the largest K = C*kh*kw that conv2d_forward_direct accepts, and whether this
# compiler built its vectorised kernel (else it is slower than im2col + GEMM)
MAX_DIRECT_TAPS = DIRECT_MAX_TAPS
DIRECT_IS_VECTORIZED = bool(DIRECT_VECTORIZED)


def force_vector_width(width):
    """Run the kernel with vectors of width bytes (32 or 64), or as the CPU suits
    (None): for the tests, which check that both widths give the same bits."""
    set_vector_width(width, "_conv_direct")


cdef Py_ssize_t row_length(Geometry g) noexcept nogil:
    """Elements per prepared input row (output width + taps' reach + slack)."""
    return g.out_width + ((g.kernel_w - 1) * g.dilation_w) // g.stride_w + DIRECT_COLUMNS


cdef int band_input_rows(Geometry g, int band) noexcept nogil:
    """Input rows that a band of `band` consecutive output rows reads."""
    return (band - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1


def forward_band(Geometry g):
    """Output rows per task of conv2d_forward_direct: a quarter of an image's (neighbouring
    rows share cache lines at their ends: split finer, two threads would write them)."""
    return (g.out_height + 3) // 4


def band_elements(Geometry g, int band):
    """Elements of the prepared input rows of a band of `band` output rows (a thread's
    workspace for the direct kernels)."""
    return <Py_ssize_t> g.channels * band_input_rows(g, band) * g.stride_w * row_length(g)


cdef void padded_row(const floating* image_row, floating* dst, int phase, Geometry g,
                     Py_ssize_t row_len) noexcept nogil:
    """dst[j] <- the zero-padded input row at column phase + stride_w*j, for j < row_len.

    That is image_row[phase + stride_w*j - pad_w], or 0 where this falls in the
    padding or past the row; image_row NULL stands for a padding row (all 0).
    """
    cdef int lo, hi
    if image_row == NULL:
        memset(dst, 0, row_len * sizeof(floating))
        return
    valid_range(phase - g.pad_w, g.stride_w, g.width, <int> row_len, &lo, &hi)
    memset(dst, 0, lo * sizeof(floating))
    gather_strided(dst + lo, image_row + phase - g.pad_w + <Py_ssize_t> lo * g.stride_w, hi - lo,
                   g.stride_w)
    memset(dst + hi, 0, (row_len - hi) * sizeof(floating))


cdef void prepare_band(const floating* image, floating* rows, Geometry g, int oh0, int count,
                       int band_rows, int phases) noexcept nogil:
    """rows <- the input rows that output rows [oh0, oh0 + count) of one image (C, H, W) read,
    for the direct kernels, each copied once.

    Row ((c*band_rows + r)*stride_w + phase) holds padded_row(input row
    (c, oh0*sh - ph + r), phase), for r < band_input_rows(count) <= band_rows and
    phase < phases (phases_read).  Output row oh0 + j then finds tap (c, ki, kj)
    as a contiguous run at rows + j*sh*stride_w*row_length + tap_offset[k]
    (tap_offsets), from j = ow on.
    """
    cdef int c, r, phase, ih
    cdef Py_ssize_t row_len = row_length(g)
    cdef const floating* src
    for c in range(g.channels):
        for r in range(band_input_rows(g, count)):
            ih = oh0 * g.stride_h - g.pad_h + r
            src = (image + (<Py_ssize_t> c * g.height + ih) * g.width
                   if 0 <= ih < g.height else NULL)
            for phase in range(phases):
                padded_row(src, rows + ((c * band_rows + r) * g.stride_w + phase) * row_len,
                           phase, g, row_len)


cdef inline Py_ssize_t band_row_step(Geometry g) noexcept nogil:
    """Elements from one output row's prepared rows to the next's, within a band."""
    return g.stride_h * g.stride_w * row_length(g)


cdef int phases_read(Geometry g) noexcept nogil:
    """1 + the highest stride phase a tap reads (kj*dw % stride_w for kj < kw): the rows
    of higher phases are never read (a 1x1 kernel of stride 2 reads phase 0 only)."""
    cdef int kj, phases = 1
    for kj in range(g.kernel_w):
        phases = max(phases, (kj * g.dilation_w) % g.stride_w + 1)
    return phases


cdef void tap_offsets(Geometry g, int band_rows, Py_ssize_t* tap_offset) noexcept nogil:
    """tap_offset[k] <- where the run of tap k = (c, ki, kj) (the weight's order) starts
    for a band's first output row in the rows that prepare_band lays out."""
    cdef int c, ki, kj, shift
    cdef Py_ssize_t row_len = row_length(g)
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            for kj in range(g.kernel_w):
                shift = kj * g.dilation_w
                tap_offset[(c * g.kernel_h + ki) * g.kernel_w + kj] = (
                    ((c * band_rows + ki * g.dilation_h) * g.stride_w + shift % g.stride_w)
                    * row_len + shift // g.stride_w)


def conv2d_forward_direct(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                          const floating[:, ::1] weight,   # IN  (OC, K), K <= MAX_DIRECT_TAPS
                          const floating[::1] bias,        # IN  (OC,), or empty for no bias
                          floating[:, ::1] rows,           # WORK (threads, band_elements(g, forward_band(g)))
                          floating[:, :, :, ::1] out,      # OUT (N, OC, OH, OW)
                          Geometry g, int activation, int num_threads):
    """out = weight * x + bias, then the activation of that code (see _elementwise.pxd;
    0: none), without im2col.

    For layers with few taps (see _direct_conv.h).  Each (image, band of
    forward_band output rows) is one task: the input rows the band reads are
    prepared in the thread's slice of rows, then the C kernel computes all
    output channels of each row.  A band is a quarter of an image's rows:
    neighbouring rows share cache lines at their ends (numpy's arrays are
    16-byte aligned), and dealt out one by one they went to the two threads in
    turn, which then wrote the same lines (the kernel ran 1.1x faster on 2
    threads than on 1, then 1.7-1.9x).
    """
    cdef Py_ssize_t N = x.shape[0], task
    cdef int OC = weight.shape[0], K = weight.shape[1]
    cdef int OH = g.out_height, OW = g.out_width
    cdef Py_ssize_t P = <Py_ssize_t> OH * OW
    cdef Py_ssize_t tap_offset[DIRECT_MAX_TAPS]
    cdef int band = forward_band(g), bands = (OH + band - 1) // band
    cdef int n, oh0, j, count, phases = phases_read(g), band_rows = band_input_rows(g, band)
    cdef Py_ssize_t step = band_row_step(g)
    cdef const floating* bias_ptr = &bias[0] if bias.shape[0] > 0 else NULL
    cdef floating* scratch
    tap_offsets(g, band_rows, tap_offset)
    with nogil:
        for task in prange(N * bands, schedule='dynamic', num_threads=num_threads):
            n = task // bands
            oh0 = task % bands * band
            count = min(band, OH - oh0)
            scratch = &rows[threadid(), 0]
            prepare_band(&x[n, 0, 0, 0], scratch, g, oh0, count, band_rows, phases)
            for j in range(count):
                conv_row_direct(&weight[0, 0], bias_ptr, scratch + j * step, tap_offset, OC, K,
                                OW, activation, &out[n, 0, oh0 + j, 0], P)


def weight_grad_lanes(dtype_size):
    """Partial sums kept per (output channel, tap) by conv2d_weight_grad_direct, for
    elements of dtype_size bytes (its lanes workspace holds OC*K times this many)."""
    return WEIGHT_GRAD_VECTOR_BYTES // dtype_size


def conv2d_weight_grad_direct(const floating[:, :, :, ::1] grad_out,  # IN    (N, OC, OH, OW)
                              const floating[:, :, :, ::1] x,         # IN    (N, C, H, W)
                              const floating[:, :, :, ::1] out,       # IN    (N, OC, OH, OW) forward output, with fuse_relu
                              floating[:, ::1] grad_weight,          # INOUT (OC, K), accumulated
                              floating[::1] grad_bias,               # INOUT (OC,), accumulated; empty for no bias
                              floating[:, ::1] rows,                 # WORK  (threads, band_elements(g, BAND))
                              floating[:, ::1] dy_rows,              # WORK  (threads, OC*BAND*ldy), ldy = ceil(OW/L)*L
                              floating[:, ::1] lanes,                # WORK  (threads, OC*K*L)
                              double[:, ::1] sums,                   # WORK  (chunks, OC*(K + 1))
                              Geometry g, bint fuse_relu, int num_threads):
    """dW += sum_n dY_n * x_n (the weight gradient of conv2d_forward_direct), db += sum dY,
    without im2col: for layers with few taps whose input gradient is not wanted (a
    network's first layer).  L = weight_grad_lanes(itemsize).

    The batch is cut into chunks (as many as sums has rows: fixed by the shapes, never
    by the thread count), one work item each.  Per image, for each band of
    BAND = WEIGHT_GRAD_BAND output rows, the input rows they read are prepared as for
    the forward and their output gradient (masked by the forward output's sign with
    fuse_relu) copied into dy_rows, zero past OW; the C kernel
    (_direct_weight_grad.h) adds their products into L lanes per (oc, k), which are
    added in order into the chunk's double sums at the end of the image.
    The chunks' sums are then added in order, and rounded once into grad_weight.
    """
    cdef Py_ssize_t N = x.shape[0], chunks = sums.shape[0], item, i, j
    cdef int OC = grad_weight.shape[0], K = grad_weight.shape[1], OH = g.out_height
    cdef int OW = g.out_width, L = WEIGHT_GRAD_VECTOR_BYTES // sizeof(floating)
    cdef int BAND = WEIGHT_GRAD_BAND
    cdef Py_ssize_t ldy = (OW + L - 1) // L * L, step = band_row_step(g), n
    cdef Py_ssize_t tap_offset[DIRECT_MAX_TAPS]
    cdef int band, oh, r, count, oc, l, phases = phases_read(g), slot
    cdef int band_rows = band_input_rows(g, BAND)
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef double total
    cdef floating* dy
    tap_offsets(g, band_rows, tap_offset)
    with nogil:
        for item in prange(chunks, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            memset(&sums[item, 0], 0, OC * (K + 1) * sizeof(double))
            memset(&dy_rows[slot, 0], 0, OC * BAND * ldy * sizeof(floating))   # zero tails
            for n in range(item * N // chunks, (item + 1) * N // chunks):
                memset(&lanes[slot, 0], 0, <Py_ssize_t> OC * K * L * sizeof(floating))
                for band in range((OH + BAND - 1) // BAND):
                    oh = band * BAND
                    count = min(BAND, OH - oh)
                    prepare_band(&x[n, 0, 0, 0], &rows[slot, 0], g, oh, count, band_rows,
                                 phases)
                    for r in range(count):
                        for oc in range(OC):
                            dy = &dy_rows[slot, (oc * count + r) * ldy]
                            if fuse_relu:
                                relu_mask_run(&grad_out[n, oc, oh + r, 0],
                                              &out[n, oc, oh + r, 0], dy, OW)
                            else:
                                memcpy(dy, &grad_out[n, oc, oh + r, 0], OW * sizeof(floating))
                            sums[item, OC * K + oc] += sum_run(dy, OW)
                    conv_rows_weight_grad(&dy_rows[slot, 0], ldy, count, &rows[slot, 0],
                                          step, tap_offset, OC, K, OW, &lanes[slot, 0])
                for i in range(OC * K):
                    total = 0
                    for l in range(L):
                        total = total + lanes[slot, i * L + l]
                    sums[item, i] += total
        for i in prange(OC * (K + 1), schedule='static', num_threads=num_threads):
            total = 0
            for j in range(chunks):
                total = total + sums[j, i]
            if i < OC * K:
                grad_weight[i // K, i % K] += <floating> total
            elif has_bias:
                grad_bias[i - OC * K] += <floating> total
