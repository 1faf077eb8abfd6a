"""Elementwise kernels over flat (contiguous) arrays: the activations, and the sum of
two arrays that residual connections need (with the activation after it, if any).

Each element is independent, so prange over elements gives the same result for
any thread count and schedule.  The schedule is 'guided' (threads take
shrinking chunks from a shared counter): a thread that loses its core to
another process does not hold the others up.
"""
from cython cimport floating
from cython.parallel cimport prange

from cyconv._elementwise cimport activate, relu, relu6, relu6_mask_run, relu_mask_run

# Elements per task of the masked-gradient loops (whole runs, so they vectorise).
cdef Py_ssize_t RUN = 4096


def relu_forward(const floating[::1] x,   # IN  (M,)
                 floating[::1] out,       # OUT (M,)
                 int num_threads):
    """out = max(x, 0); NaN stays NaN (as in PyTorch), so divergence is not hidden."""
    cdef Py_ssize_t i
    for i in prange(x.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        out[i] = relu(x[i])


def relu_backward(const floating[::1] out,       # IN  (M,) the forward output
                  const floating[::1] grad_out,  # IN  (M,)
                  floating[::1] grad_input,      # OUT (M,)
                  int num_threads):
    """grad_input = grad_out where the output was positive, else 0."""
    cdef Py_ssize_t M = out.shape[0], task, start
    for task in prange((M + RUN - 1) // RUN, nogil=True, schedule='guided',
                       num_threads=num_threads):
        start = task * RUN
        relu_mask_run(&grad_out[start], &out[start], &grad_input[start], min(RUN, M - start))


def relu6_forward(const floating[::1] x,   # IN  (M,)
                  floating[::1] out,       # OUT (M,)
                  int num_threads):
    """out = min(max(x, 0), 6); NaN stays NaN (as in PyTorch)."""
    cdef Py_ssize_t i
    for i in prange(x.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        out[i] = relu6(x[i])


def relu6_backward(const floating[::1] out,       # IN  (M,) the forward output
                   const floating[::1] grad_out,  # IN  (M,)
                   floating[::1] grad_input,      # OUT (M,)
                   int num_threads):
    """grad_input = grad_out where 0 < output < 6 (0 < input < 6), else 0."""
    cdef Py_ssize_t M = out.shape[0], task, start
    for task in prange((M + RUN - 1) // RUN, nogil=True, schedule='guided',
                       num_threads=num_threads):
        start = task * RUN
        relu6_mask_run(&grad_out[start], &out[start], &grad_input[start], min(RUN, M - start))


def leaky_relu_forward(const floating[::1] x,   # IN  (M,)
                       floating[::1] out,       # OUT (M,)
                       double negative_slope, int num_threads):
    """out = x where x > 0, else negative_slope * x."""
    cdef Py_ssize_t i
    cdef floating slope = <floating> negative_slope
    for i in prange(x.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        out[i] = x[i] if x[i] > 0 else slope * x[i]


def leaky_relu_backward(const floating[::1] x,         # IN  (M,) the forward input
                        const floating[::1] grad_out,  # IN  (M,)
                        floating[::1] grad_input,      # OUT (M,)
                        double negative_slope, int num_threads):
    """grad_input = grad_out where x > 0, else negative_slope * grad_out."""
    cdef Py_ssize_t i
    cdef floating slope = <floating> negative_slope
    cdef floating g
    for i in prange(x.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        g = grad_out[i]
        grad_input[i] = g if x[i] > 0 else slope * g


def add_arrays(const floating[::1] a,   # IN  (M,)
               const floating[::1] b,   # IN  (M,)
               floating[::1] out,       # OUT (M,)
               int activation, int num_threads):
    """out = a + b, then the activation of that code (_elementwise.pxd; 0: none): a
    residual connection's output, or the gradient of an input that feeds both of its
    paths."""
    cdef Py_ssize_t i
    for i in prange(a.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        out[i] = activate(a[i] + b[i], activation)
