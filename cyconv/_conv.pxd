from cython cimport floating

# Shape of one 2-D convolution (or pooling) problem, per image.
cdef struct Geometry:
    int channels           # C: input channels
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
cdef void padded_row(const floating* image_row, floating* dst, int phase, Geometry g,
                     Py_ssize_t row_len) noexcept nogil
