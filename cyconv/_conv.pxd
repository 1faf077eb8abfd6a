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
