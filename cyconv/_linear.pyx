"""Fully connected layer kernels: y = x @ W^T + b and its gradients.

Layouts: x (N, F), weight (O, F) as PyTorch stores it, out (N, O).
Work is split into fixed blocks of output features (forward, weight gradient)
or input features (input gradient), one single-threaded BLAS call per block:
the blocks do not depend on the thread count, so neither do the results.
"""
from cython cimport floating
from cython.parallel cimport prange

from cyconv._blas cimport gemm

cdef int OUT_BLOCK = 64    # output features per task
cdef int IN_BLOCK = 256    # input features per task (input gradient)


def linear_forward(const floating[:, ::1] x,        # IN  (N, F)
                   const floating[:, ::1] weight,   # IN  (O, F)
                   const floating[::1] bias,        # IN  (O,), or empty for no bias
                   floating[:, ::1] out,            # OUT (N, O)
                   int num_threads):
    """out = x @ weight^T + bias."""
    cdef int N = x.shape[0], F = x.shape[1], O = weight.shape[0]
    cdef int blocks = (O + OUT_BLOCK - 1) // OUT_BLOCK
    cdef int block, o0, width, n, o
    if N == 0:
        return
    for block in prange(blocks, nogil=True, schedule='dynamic', num_threads=num_threads):
        o0 = block * OUT_BLOCK
        width = min(OUT_BLOCK, O - o0)
        gemm(False, True, N, width, F, 1, &x[0, 0], F, &weight[o0, 0], F, 0, &out[0, o0], O)
        if bias.shape[0] > 0:
            for n in range(N):
                for o in range(o0, o0 + width):
                    out[n, o] += bias[o]


def linear_backward(const floating[:, ::1] grad_out,   # IN    (N, O)
                    const floating[:, ::1] x,          # IN    (N, F)
                    const floating[:, ::1] weight,     # IN    (O, F)
                    floating[:, ::1] grad_weight,      # INOUT (O, F), accumulated
                    floating[::1] grad_bias,           # INOUT (O,), accumulated; empty for no bias
                    floating[:, ::1] grad_input,       # OUT   (N, F); unused without input grad
                    bint need_input_grad, int num_threads):
    """grad_weight += grad_out^T @ x; grad_bias += sum_n grad_out; grad_input = grad_out @ weight."""
    cdef int N = x.shape[0], F = x.shape[1], O = weight.shape[0]
    cdef int out_blocks = (O + OUT_BLOCK - 1) // OUT_BLOCK
    cdef int in_blocks = (F + IN_BLOCK - 1) // IN_BLOCK
    cdef int block, o0, f0, width, n, o
    cdef double total
    if N == 0:
        return
    for block in prange(out_blocks, nogil=True, schedule='dynamic', num_threads=num_threads):
        o0 = block * OUT_BLOCK
        width = min(OUT_BLOCK, O - o0)
        gemm(True, False, width, F, N, 1, &grad_out[0, o0], O, &x[0, 0], F,
             1, &grad_weight[o0, 0], F)
        if grad_bias.shape[0] > 0:
            for o in range(o0, o0 + width):
                total = 0
                for n in range(N):
                    total = total + grad_out[n, o]
                grad_bias[o] += <floating> total
    if need_input_grad:
        for block in prange(in_blocks, nogil=True, schedule='dynamic', num_threads=num_threads):
            f0 = block * IN_BLOCK
            width = min(IN_BLOCK, F - f0)
            gemm(False, False, N, width, O, 1, &grad_out[0, 0], O, &weight[0, f0], F,
                 0, &grad_input[0, f0], F)
