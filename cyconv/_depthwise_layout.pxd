# The prepared-plane layout of the depthwise kernels (_depthwise.pyx): sizes, tap
# offsets and the copies between it and the input plane.
#
# An input plane is prepared once in the thread's workspace: zero-padded and split
# by stride phase in both directions into blocks (hp, wp) of Rh rows of L
# elements, element (i, j) of block (hp, wp) being the padded input pixel
# (i*sh + hp, j*sw + wp), L = OW + (kw-1)*dw // sw, Rh = OH + (kh-1)*dh // sh.
# Then tap t = (ki, kj) of every output pixel (oh, ow), taken in a row pitch of L,
# is one contiguous run of OH*L elements at tap_offset[t] = ((hp*sw + wp)*Rh + b)*L
# + a, where (b, hp) = divmod(ki*dh, sh) and (a, wp) = divmod(kj*dw, sw): a whole
# plane is one run per tap, whatever the stride, padding and dilation.  The
# columns past OW of each pitch-L row are junk: discarded by the forward, and
# multiplied by a zero output gradient in backward (the prepared plane holds 0
# wherever no window reads, so that junk never meets an inf: see plan_copies).
#
# The output gradient's planes wait in the runs in the same pitch, each after a lead
# of zeros (the largest tap offset) and followed by zeros up to dy_stride, so that
# for stride 1 every element of a prepared-layout plane can gather its taps from
# them (element q meets dy element q - tap_offset[t]).
from cython cimport floating
from libc.string cimport memset

from cyconv._conv cimport Geometry, valid_range
from cyconv._direct_conv cimport DIRECT_COLUMNS

cdef extern from "_depthwise.h" nogil:
    # float and double versions, one name (see _typed.h): rows moved between layouts,
    # dst[r*dst_pitch + k*dst_step] = src[r*src_pitch + k*src_step] for r < rows, k < width,
    # masked by mask > 0 unless mask is NULL
    void copy_runs(...)   # (T* dst, dst_pitch, dst_step, const T* src, src_pitch, src_step,
                          #  const T* mask, rows, width)


cdef inline Py_ssize_t pitch(Geometry g) noexcept nogil:
    """L: elements per prepared row, and the row pitch of the runs."""
    return g.out_width + (g.kernel_w - 1) * g.dilation_w // g.stride_w


cdef inline Py_ssize_t block_rows(Geometry g) noexcept nogil:
    """Rh: rows per stride-phase block of a prepared plane."""
    return g.out_height + (g.kernel_h - 1) * g.dilation_h // g.stride_h


cdef inline Py_ssize_t blocks_size(Geometry g) noexcept nogil:
    return g.stride_h * g.stride_w * block_rows(g) * pitch(g)


cdef inline Py_ssize_t slack(Geometry g) noexcept nogil:
    """Elements after the blocks that a run may reach: its junk columns past the last block
    (up to L - OW), and the vector loads past its end (DIRECT_COLUMNS - 1)."""
    return pitch(g) - g.out_width + DIRECT_COLUMNS


cdef inline Py_ssize_t tap_offset_of(int ki, int kj, Geometry g) noexcept nogil:
    return ((((ki * g.dilation_h % g.stride_h) * g.stride_w + kj * g.dilation_w % g.stride_w)
             * block_rows(g) + ki * g.dilation_h // g.stride_h) * pitch(g)
            + kj * g.dilation_w // g.stride_w)


cdef inline Py_ssize_t lead(Geometry g) noexcept nogil:
    """Zeros before each output-gradient plane in the runs: the largest tap offset."""
    cdef Py_ssize_t largest = 0
    cdef int ki, kj
    for ki in range(g.kernel_h):
        for kj in range(g.kernel_w):
            largest = max(largest, tap_offset_of(ki, kj, g))
    return largest


cdef inline Py_ssize_t dy_stride(Geometry g) noexcept nogil:
    """Elements per output-gradient plane in the runs: its lead of zeros, then Rh*L (its
    OH*L elements and zeros): all that the input gradient's runs read."""
    return lead(g) + block_rows(g) * pitch(g)


cdef inline void plan_copies(Py_ssize_t[:, ::1] copies, Geometry g) noexcept:
    """copies[k] <- (offset in a prepared plane, offset in an input plane, rows, width) of
    the k-th block of input pixels that some window reads; rows 0 for the unused ones.

    Block (hp, wp) holds the pixels (i*sh + hp - ph, j*sw + wp - pw).  Tap
    column kj reads elements [a, a + OW) of phase (kj*dw) % sw, a = kj*dw // sw;
    the others (past the last window, or between dilated taps) would only ever
    meet junk columns, so they are never copied (they stay 0).
    """
    cdef int hp, wp, i0, i1, lo, hi, kj, start, end, a, k = 0
    copies[:, :] = 0
    for hp in range(g.stride_h):
        valid_range(hp - g.pad_h, g.stride_h, g.height, <int> block_rows(g), &i0, &i1)
        for wp in range(g.stride_w):
            valid_range(wp - g.pad_w, g.stride_w, g.width, <int> pitch(g), &lo, &hi)
            start = end = 0
            for kj in range(g.kernel_w + 1):
                if kj < g.kernel_w and kj * g.dilation_w % g.stride_w != wp:
                    continue
                a = kj * g.dilation_w // g.stride_w if kj < g.kernel_w else end + 1
                if a > end:  # a gap, or past the last tap: the interval [start, end) is done
                    if min(end, hi) > max(start, lo) and i1 > i0:
                        copies[k, 0] = (((hp * g.stride_w + wp) * block_rows(g) + i0) * pitch(g)
                                        + max(start, lo))
                        copies[k, 1] = (<Py_ssize_t> (i0 * g.stride_h + hp - g.pad_h) * g.width
                                        + wp + max(start, lo) * g.stride_w - g.pad_w)
                        copies[k, 2] = i1 - i0
                        copies[k, 3] = min(end, hi) - max(start, lo)
                        k += 1
                    start = a
                end = a + g.out_width


cdef inline void prepare_plane(const floating* image, floating* plane, const Py_ssize_t* copies,
                        int count, Geometry g) noexcept nogil:
    """plane <- one input plane (H, W) in the prepared layout (see the module docstring).

    Only the elements that windows read are written (copies: plan_copies): the
    caller zeroed the plane once (clear), and every plane of a layer writes the
    same elements.
    """
    cdef int k
    for k in range(count):
        copy_runs(plane + copies[4 * k], pitch(g), 1, image + copies[4 * k + 1],
                  g.stride_h * g.width, g.stride_w, NULL, copies[4 * k + 2], copies[4 * k + 3])


cdef inline void unprepare_plane(const floating* plane, floating* image, const Py_ssize_t* copies,
                          int count, Geometry g) noexcept nogil:
    """image (H, W) <- the input pixels of a prepared-layout plane (0 for those no window
    reads): prepare_plane backwards."""
    cdef int k
    memset(image, 0, <Py_ssize_t> g.height * g.width * sizeof(floating))
    for k in range(count):
        copy_runs(image + copies[4 * k + 1], g.stride_h * g.width, g.stride_w,
                  plane + copies[4 * k], pitch(g), 1, NULL, copies[4 * k + 2], copies[4 * k + 3])
