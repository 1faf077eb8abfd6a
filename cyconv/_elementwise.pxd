# Elementwise rules that several kernel families share (activation, norm, conv).
from cython cimport floating


# The activations that batch norm's kernels can apply after the normalisation,
# and the convolutions' forward kernels after the bias (their codes in Python:
# cyconv/nn/activation.py); 1 is also `True`, the fuse_relu flag of the kernels
# that know no other.
cdef enum Activation:
    NO_ACTIVATION = 0
    RELU = 1
    RELU6 = 2


cdef inline floating relu(floating x) noexcept nogil:
    """max(x, 0) keeping NaN (as PyTorch does): a select the compiler vectorises."""
    return 0 if x <= 0 else x


cdef inline floating relu6(floating x) noexcept nogil:
    """min(max(x, 0), 6) keeping NaN (as PyTorch does)."""
    cdef floating v = relu(x)
    return 6 if v >= 6 else v


cdef inline floating activate(floating x, int activation) noexcept nogil:
    """x through the activation of that code (NO_ACTIVATION, RELU or RELU6)."""
    if activation == RELU6:
        return relu6(x)
    return relu(x) if activation == RELU else x


# float and double versions, one name (see _typed.h), in C: _runs.h
cdef extern from "_runs.h" nogil:
    # (const T* grad, const T* out, T* masked, n): masked = grad where out > 0, else 0
    void relu_mask_run(...)
    # (const T* grad, const T* out, T* masked, n): masked = grad where 0 < out < 6, else 0
    void relu6_mask_run(...)
