# Elementwise rules that several kernel families share (activation, norm, conv).
from cython cimport floating


cdef inline floating relu(floating x) noexcept nogil:
    """max(x, 0) keeping NaN (as PyTorch does): a select the compiler vectorises."""
    return 0 if x <= 0 else x


cdef inline void relu_mask_run(const floating* grad, const floating* out, floating* masked,
                               Py_ssize_t length) noexcept nogil:
    """masked = grad where out > 0, else 0: the gradient of max(., 0) from its output.

    grad is loaded unconditionally, so the select needs no branch (a branch on the
    sign of activations mispredicts about half the time).
    """
    cdef Py_ssize_t i
    cdef floating g
    for i in range(length):
        g = grad[i]
        masked[i] = g if out[i] > 0 else 0
