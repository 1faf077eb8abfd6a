# The direct kernel's C row function (_direct_conv.h): all output channels of one
# output row from prepared input rows; used by _conv_direct.pyx and _depthwise.pyx.
cdef extern from "_direct_conv.h" nogil:
    enum: DIRECT_COLUMNS
    enum: DIRECT_MAX_TAPS
    enum: DIRECT_VECTORIZED
    # float and double versions, one name (see _typed.h): (const T* weight, const T* bias,
    # const T* rows, const Py_ssize_t* tap_offset, int OC, int K, int OW, int act, T* out,
    # Py_ssize_t P)
    void conv_row_direct(...)
