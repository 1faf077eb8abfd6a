"""Depthwise 2-D convolution kernels (groups == input channels), without im2col.

Layouts (row-major, C-contiguous), M = output channels per input channel:
    x        (N, C, H, W)       input batch
    weight   (C*M, taps)        the (C*M, 1, kh, kw) weight viewed flat, taps = kh*kw
    out      (N, C*M, OH, OW)   output channel c*M + m reads input channel c only
    planes   (threads, plane)   one prepared input plane per thread (plane_size)
    runs     (threads, runs)    M output (gradient) planes in a row pitch of L (runs_size)

An input plane is prepared once in the thread's workspace so that every tap of every
output pixel of a plane is one contiguous run (see _depthwise_layout.pxd).

Forward: prange over (image, channel) planes, several small planes per task; the
runs of a plane's M output channels are computed in registers (depthwise_run for
M = 1, else the direct kernel's row function, _direct_conv.h), then copied into
the output rows.  Backward: prange over blocks of channels whose planes lie side
by side, the images in order inside, so the weight and bias gradients (sums over
images) take the same order for any thread count; the input gradient of a plane
is gathered from the output gradient's runs for stride 1 (like the forward),
else scattered into a prepared-layout plane run by run; then copied out without
its padding.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from cyconv._conv cimport Geometry
from cyconv._direct_conv cimport DIRECT_COLUMNS, conv_row_direct
from cyconv._depthwise_layout cimport (blocks_size, block_rows, copy_runs, dy_stride, lead,
                                       pitch, plan_copies, prepare_plane, slack,
                                       tap_offset_of, unprepare_plane)
from cyconv._reduce cimport sum_run
from cyconv._vectors cimport set_vector_width

cdef extern from "_depthwise.h" nogil:
    # float and double versions, one name each (see _typed.h and _depthwise.h)
    void depthwise_weight_grad(...)   # (const T* dy, const T* rows, const Py_ssize_t* tap_offset,
                                      #  int taps, Py_ssize_t length, T* lanes, double* sums,
                                      #  int flush)
    void depthwise_scatter(...)       # (T* rows, const Py_ssize_t* tap_offset, const T* weight,
                                      #  int taps, const T* dy, Py_ssize_t length)
    void depthwise_run(...)           # (const T* weight, const T* bias, const T* rows,
                                      #  const Py_ssize_t* tap_offset, int taps, Py_ssize_t n,
                                      #  int act, T* out)


# The weight gradient's lane sums of a channel (in the input's precision) go to its
# double sums after 4096 products per lane at most: a bound on their rounding.
cdef Py_ssize_t FLUSH_ELEMENTS = 4096 * DIRECT_COLUMNS
LANES = DIRECT_COLUMNS


def force_vector_width(width):
    """Run the kernels with vectors of width bytes (32 or 64), or as the CPU suits
    (None): for the tests, which check that both widths give the same bits."""
    set_vector_width(width, "_depthwise")


def plane_size(Geometry g):
    """Elements of a prepared plane: the sh*sw blocks, then the slack."""
    return blocks_size(g) + slack(g)


def runs_size(Geometry g, int planes):
    """Elements of the runs of `planes` output planes, then room for the vector loads past
    the last."""
    return planes * dy_stride(g) + DIRECT_COLUMNS


cdef void set_tap_offsets(Py_ssize_t* tap_offset, Geometry g, int M) noexcept:
    """tap_offset[t], t < taps: the run of tap t in a prepared plane; then, for the input
    gradient of stride 1, tap_offset[taps + m*taps + t] = m*dy_stride + lead - tap_offset[t]:
    the runs in the output-gradient planes that meet element 0 of the prepared plane."""
    cdef int ki, kj, m, taps = g.kernel_h * g.kernel_w
    for ki in range(g.kernel_h):
        for kj in range(g.kernel_w):
            tap_offset[ki * g.kernel_w + kj] = tap_offset_of(ki, kj, g)
    for m in range(M):
        for ki in range(taps):
            tap_offset[taps + m * taps + ki] = m * dy_stride(g) + lead(g) - tap_offset[ki]


def copies_size(Geometry g):
    """The most copies plan_copies makes: one per merged interval per phase."""
    return g.stride_h * g.kernel_w


cdef void clear(floating[:, ::1] workspace) noexcept nogil:
    if workspace.shape[0] > 0:
        memset(&workspace[0, 0], 0, workspace.shape[0] * workspace.shape[1] * sizeof(floating))


cdef inline void output_runs(const floating* weight, const floating* bias, const floating* plane,
                             const Py_ssize_t* tap_offset, int M, int taps, Py_ssize_t run,
                             int activation, floating* result) noexcept nogil:
    """result (M, run) <- the M output planes of one prepared input plane, in pitch L."""
    if M == 1:
        depthwise_run(weight, bias, plane, tap_offset, taps, run, activation, result)
    else:  # M channels at a time, from the same runs
        conv_row_direct(weight, bias, plane, tap_offset, M, taps, <int> run, activation, result,
                        run)


def depthwise_forward(const floating[:, :, :, ::1] x,   # IN   (N, C, H, W)
                      const floating[:, ::1] weight,   # IN   (C*M, taps)
                      const floating[::1] bias,        # IN   (C*M,), or empty for no bias
                      Py_ssize_t[::1] tap_offset,      # WORK (taps*(1 + M),)
                      Py_ssize_t[:, ::1] copies,       # WORK (copies_size, 4)
                      floating[:, ::1] planes,         # WORK (threads, plane_size)
                      floating[:, ::1] runs,           # WORK (threads, runs_size(g, M))
                      floating[:, :, :, ::1] out,      # OUT  (N, C*M, OH, OW)
                      Geometry g, int planes_per_task, int activation, int num_threads):
    """out = depthwise conv(x) + bias, then the activation of that code (see
    _elementwise.pxd; 0: none), plane by plane
    (prange over (image, channel) planes, planes_per_task at a time)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], task, run = g.out_height * pitch(g)
    cdef int M = out.shape[1] // C, taps = weight.shape[1], n, c
    cdef const floating* bias_ptr = &bias[0] if bias.shape[0] > 0 else NULL
    cdef floating* plane
    cdef floating* result
    set_tap_offsets(&tap_offset[0], g, M)
    plan_copies(copies, g)
    with nogil:
        clear(planes)
        for task in prange(N * C, schedule='dynamic', chunksize=planes_per_task,
                           num_threads=num_threads):
            n = task // C
            c = task % C
            plane = &planes[threadid(), 0]
            result = &runs[threadid(), 0]
            prepare_plane(&x[n, c, 0, 0], plane, &copies[0, 0], copies.shape[0], g)
            output_runs(&weight[c * M, 0], bias_ptr + c * M if bias_ptr else NULL, plane,
                        &tap_offset[0], M, taps, run, activation, result)
            copy_runs(&out[n, c * M, 0, 0], g.out_width, 1, result, pitch(g), 1, NULL,
                      M * g.out_height, g.out_width)


cdef void add_plane_grads(const floating* dy, Py_ssize_t stride, const floating* plane,
                          const Py_ssize_t* tap_offset, int M, int taps, Geometry g,
                          bint has_bias, floating* lanes, double* sums, bint flush) noexcept nogil:
    """sums (M, taps + 1) += for each of M output-gradient planes (their OH*L elements at
    dy + m*stride): the weight gradient of its taps over the prepared input plane
    (waiting in lanes (M, taps, LANES) until flush: see _depthwise.h), then its bias
    gradient."""
    cdef Py_ssize_t run = g.out_height * pitch(g)
    cdef int m
    for m in range(M):
        depthwise_weight_grad(dy + m * stride, plane, tap_offset, taps, run,
                              lanes + m * taps * DIRECT_COLUMNS, sums + m * (taps + 1), flush)
        if has_bias:
            sums[m * (taps + 1) + taps] += sum_run(dy + m * stride, run)


cdef void plane_input_grad(const floating* runs, Py_ssize_t lead_, Py_ssize_t stride,
                           const floating* weight, const Py_ssize_t* tap_offset,
                           const Py_ssize_t* copies, int count, int M, int taps, Geometry g,
                           floating* grad_plane, floating* image_grad) noexcept nogil:
    """image_grad (H, W) = the gradient of one input plane from its M output-gradient planes
    (at runs + lead_ + m*stride) and their weights (M, taps), through grad_plane
    (plane_size).

    Stride 1: each element of grad_plane gathers its taps from the runs (one
    run per tap, like the forward).  Otherwise each tap's run is scattered
    (added) into grad_plane, the transpose of the forward's reads.
    """
    cdef Py_ssize_t run = g.out_height * pitch(g)
    cdef int m
    if g.stride_h == 1 and g.stride_w == 1:
        depthwise_run(weight, NULL, runs, tap_offset + taps, M * taps, blocks_size(g), 0,
                      grad_plane)
    else:
        memset(grad_plane, 0, (blocks_size(g) + slack(g)) * sizeof(floating))
        for m in range(M):
            depthwise_scatter(grad_plane, tap_offset, weight + m * taps, taps,
                              runs + m * stride + lead_, run)
    unprepare_plane(grad_plane, image_grad, copies, count, g)


def depthwise_backward(const floating[:, :, :, ::1] grad_out,  # IN    (N, C*M, OH, OW)
                       const floating[:, :, :, ::1] x,         # IN    (N, C, H, W) the forward input
                       const floating[:, :, :, ::1] out,       # IN    (N, C*M, OH, OW) forward output (relu mask)
                       const floating[:, ::1] weight,         # IN    (C*M, taps)
                       floating[:, ::1] grad_weight,          # INOUT (C*M, taps), accumulated
                       floating[::1] grad_bias,               # INOUT (C*M,), accumulated; empty for no bias
                       Py_ssize_t[::1] tap_offset,            # WORK  (taps*(1 + M),)
                       Py_ssize_t[:, ::1] copies,             # WORK  (copies_size, 4)
                       floating[:, ::1] planes,               # WORK  (threads, plane_size)
                       floating[:, ::1] grad_planes,          # WORK  (threads, plane_size) for input grad
                       floating[:, ::1] runs,                 # WORK  (threads, runs_size(g, M))
                       floating[:, ::1] lanes,                # WORK  (threads, B*M*taps*LANES)
                       double[:, ::1] sums,                   # WORK  (threads, B*M*(taps + 1))
                       floating[:, :, :, ::1] grad_input,     # OUT   (N, C, H, W); unused without input grad
                       Geometry g, int channels_per_task, bint fuse_relu, bint need_input_grad,
                       int num_threads):
    """dW, db (sums over images, in image order) and dx, by blocks of B = channels_per_task
    channels (prange over blocks; images, then the block's channels, inside: B planes
    that lie side by side in memory).

    Each channel's sums take its images in order, whatever B and the thread
    count.  With fuse_relu, dY is first masked by the forward output's sign, as
    it is copied into the runs' pitch.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], block, c, n, run = g.out_height * pitch(g)
    cdef int M = grad_out.shape[1] // C, taps = weight.shape[1], slot, m, t, B = channels_per_task
    cdef int flush_every = max(1, FLUSH_ELEMENTS // run)
    cdef Py_ssize_t lead_ = lead(g), stride = dy_stride(g)
    cdef bint has_bias = grad_bias.shape[0] > 0
    cdef double* channel_sums
    set_tap_offsets(&tap_offset[0], g, M)
    plan_copies(copies, g)
    with nogil:
        clear(planes)
        clear(runs)
        clear(lanes)
        for block in prange((C + B - 1) // B, schedule='dynamic', num_threads=num_threads):
            slot = threadid()
            memset(&sums[slot, 0], 0, sums.shape[1] * sizeof(double))
            for n in range(N):
                for c in range(block * B, min(C, block * B + B)):
                    channel_sums = &sums[slot, (c - block * B) * M * (taps + 1)]
                    for m in range(M):
                        copy_runs(&runs[slot, m * stride + lead_], pitch(g), 1,
                                  &grad_out[n, c * M + m, 0, 0], g.out_width, 1,
                                  &out[n, c * M + m, 0, 0] if fuse_relu else NULL,
                                  g.out_height, g.out_width)
                    prepare_plane(&x[n, c, 0, 0], &planes[slot, 0], &copies[0, 0],
                                  copies.shape[0], g)
                    add_plane_grads(&runs[slot, lead_], stride, &planes[slot, 0], &tap_offset[0],
                                    M, taps, g, has_bias,
                                    &lanes[slot, (c - block * B) * M * taps * DIRECT_COLUMNS],
                                    channel_sums, (n + 1) % flush_every == 0 or n == N - 1)
                    if need_input_grad:
                        plane_input_grad(&runs[slot, 0], lead_, stride, &weight[c * M, 0],
                                         &tap_offset[0], &copies[0, 0],
                                         copies.shape[0], M, taps, g, &grad_planes[slot, 0],
                                         &grad_input[n, c, 0, 0])
            for c in range(block * B, min(C, block * B + B)):
                channel_sums = &sums[slot, (c - block * B) * M * (taps + 1)]
                for m in range(M):
                    for t in range(taps):
                        grad_weight[c * M + m, t] += <floating> channel_sums[m * (taps + 1) + t]
                    if has_bias:
                        grad_bias[c * M + m] += <floating> channel_sums[m * (taps + 1) + taps]
