# The direct kernel's C row function (_direct_conv.h): all output channels of one
# output row from prepared input rows; used by _conv_direct.pyx and _depthwise.pyx.
cdef extern from "_direct_conv.h" nogil:
    enum: DIRECT_COLUMNS
    enum: DIRECT_MAX_TAPS
    enum: DIRECT_VECTORIZED
    void conv_row_direct_float(const float* weight, const float* bias, const float* rows,
                               const Py_ssize_t* tap_offset, int OC, int K, int OW, int relu,
                               float* out, Py_ssize_t P)
    void conv_row_direct_double(const double* weight, const double* bias, const double* rows,
                                const Py_ssize_t* tap_offset, int OC, int K, int OW, int relu,
                                double* out, Py_ssize_t P)
