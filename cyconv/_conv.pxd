from cython cimport floating
from libc.string cimport memcpy


# a C kernel with a float and a double version, one name (see _typed.h)
cdef extern from "_row_loops.h" nogil:
    void gather_stride2(...)   # (T* dst, const T* src, n): dst[i] = src[2*i], i < n


# Shape of one 2-D convolution (or pooling) problem, per image; the pooling kernels
# share it.
cdef struct Geometry:
    int channels           # C: input channels (of one group)
    int height, width      # H, W: input plane
    int out_height         # OH = (H + 2*pad_h - dilation_h*(kernel_h - 1) - 1) // stride_h + 1
    int out_width          # OW, likewise
    int kernel_h, kernel_w
    int stride_h, stride_w
    int pad_h, pad_w
    int dilation_h, dilation_w

cdef void valid_range(int offset, int stride, int size, int out_size,
                      int* first, int* last) noexcept nogil

cdef void im2col(const floating* image, floating* cols, Geometry g,
                 int oh0, int oh1, int k0, int k1) noexcept nogil
cdef void col2im(const floating* cols, floating* image, Geometry g,
                 int oh0, int oh1) noexcept nogil


cdef inline void gather_strided(floating* dst, const floating* src, Py_ssize_t n,
                                int stride) noexcept nogil:
    """dst[j] = src[j*stride] for j < n: a memcpy for stride 1, vectorised C (_row_loops.h)
    for stride 2."""
    cdef Py_ssize_t j
    if stride == 1:
        memcpy(dst, src, n * sizeof(floating))
    elif stride == 2:
        gather_stride2(dst, src, n)
    else:
        for j in range(n):
            dst[j] = src[j * stride]
