"""The direct forward kernel of 2-D convolution, for layers with few taps (K = C*kh*kw,
e.g. an RGB input layer) or moderately many over wide output rows (nn/conv.py chooses),
where im2col + GEMM copies more than it gains; K <= MAX_DIRECT_TAPS.

Layouts as in _conv.pyx.  conv2d_forward_direct (its C kernel: _direct_conv.h) takes
one (image, output row) per task: the input rows it reads are copied into the
thread's workspace, split by stride phase so that every tap is a contiguous
run, and all output channels of the row are accumulated in vector registers.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memset

from cyconv._conv cimport Geometry, gather_strided, valid_range
from cyconv._direct_conv cimport (DIRECT_COLUMNS, DIRECT_MAX_TAPS, DIRECT_VECTORIZED,
                                  conv_row_direct)
from cyconv._vectors cimport set_vector_width


# the largest K = C*kh*kw that conv2d_forward_direct accepts, and whether this
# compiler built its vectorised kernel (else it is slower than im2col + GEMM)
MAX_DIRECT_TAPS = DIRECT_MAX_TAPS
DIRECT_IS_VECTORIZED = bool(DIRECT_VECTORIZED)


def force_vector_width(width):
    """Run the kernel with vectors of width bytes (32 or 64), or as the CPU suits
    (None): for the tests, which check that both widths give the same bits."""
    set_vector_width(width, "_conv_direct")


def direct_row_length(Geometry g):
    """Elements per prepared input row of conv2d_forward_direct (output width + taps' reach + slack)."""
    return g.out_width + ((g.kernel_w - 1) * g.dilation_w) // g.stride_w + DIRECT_COLUMNS


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


cdef void prepare_rows(const floating* image, floating* rows, Geometry g, int oh,
                       Py_ssize_t row_len, int phases) noexcept nogil:
    """rows <- the input rows that output row oh of one image (C, H, W) reads, for the direct kernel.

    Row ((c*kh + ki)*stride_w + phase) holds padded_row(input row
    (c, oh*sh - ph + ki*dh), phase), for phase < phases (phases_read).  Tap
    (c, ki, kj) then reads a contiguous run from row phase = kj*dw % stride_w at
    j = ow + kj*dw // stride_w.
    """
    cdef int c, ki, phase, ih
    cdef const floating* src
    for c in range(g.channels):
        for ki in range(g.kernel_h):
            ih = oh * g.stride_h - g.pad_h + ki * g.dilation_h
            src = (image + (<Py_ssize_t> c * g.height + ih) * g.width
                   if 0 <= ih < g.height else NULL)
            for phase in range(phases):
                padded_row(src, rows + ((c * g.kernel_h + ki) * g.stride_w + phase) * row_len,
                           phase, g, row_len)


cdef int phases_read(Geometry g) noexcept nogil:
    """1 + the highest stride phase a tap reads (kj*dw % stride_w for kj < kw): the rows
    of higher phases are never read (a 1x1 kernel of stride 2 reads phase 0 only)."""
    cdef int kj, phases = 1
    for kj in range(g.kernel_w):
        phases = max(phases, (kj * g.dilation_w) % g.stride_w + 1)
    return phases


def conv2d_forward_direct(const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                          const floating[:, ::1] weight,   # IN  (OC, K), K <= MAX_DIRECT_TAPS
                          const floating[::1] bias,        # IN  (OC,), or empty for no bias
                          floating[:, ::1] rows,           # WORK (threads, C*kh*stride_w*row_length)
                          floating[:, :, :, ::1] out,      # OUT (N, OC, OH, OW)
                          Geometry g, int activation, int num_threads):
    """out = weight * x + bias, then the activation of that code (see _elementwise.pxd;
    0: none), without im2col.

    For layers with few taps (see _direct_conv.h).  Each (image, output row)
    is one task: its input rows are prepared in the thread's slice of rows,
    then the C kernel computes all output channels of that row.  Threads take
    a quarter of an image's rows at a time: neighbouring rows share cache lines
    at their ends (numpy's arrays are 16-byte aligned), and dealt out one by one
    they went to the two threads in turn, which then wrote the same lines (the
    kernel ran 1.1x faster on 2 threads than on 1, now 1.7-1.9x).
    """
    cdef Py_ssize_t N = x.shape[0], task
    cdef int OC = weight.shape[0], K = weight.shape[1]
    cdef int OH = g.out_height, OW = g.out_width
    cdef Py_ssize_t P = <Py_ssize_t> OH * OW
    cdef Py_ssize_t row_len = direct_row_length(g)
    cdef Py_ssize_t tap_offset[DIRECT_MAX_TAPS]
    cdef int c, ki, kj, shift, n, oh, rows_per_chunk = (OH + 3) // 4, phases = phases_read(g)
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
        for task in prange(N * OH, schedule='dynamic', chunksize=rows_per_chunk,
                           num_threads=num_threads):
            n = task // OH
            oh = task % OH
            scratch = &rows[threadid(), 0]
            prepare_rows(&x[n, 0, 0, 0], scratch, g, oh, row_len, phases)
            conv_row_direct(&weight[0, 0], bias_ptr, scratch, tap_offset, OC, K, OW,
                            activation, &out[n, 0, oh, 0], P)
