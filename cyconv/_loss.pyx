"""Softmax + cross-entropy, fused and numerically stable.

For one row z (C logits) with label y and smoothing eps, the target is
t = (1 - eps) * onehot(y) + eps / C and
    loss = logsumexp(z) - sum_j t_j z_j,   logsumexp(z) = m + log(sum_j exp(z_j - m)), m = max z
The batch loss is the mean over rows; its gradient is (softmax(z) - t) / N.
As in PyTorch, a logit of -inf for a class other than the target is a class the
model rules out: the loss stays finite without smoothing (the sum over j is
taken only when eps > 0; with smoothing the loss is then +inf, the gradient finite).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, log
from libc.stdint cimport int64_t


def softmax_cross_entropy_forward(const floating[:, ::1] logits,   # IN  (N, C)
                                  const int64_t[::1] labels,       # IN  (N,) in [0, C)
                                  floating[:, ::1] probs,          # OUT (N, C) softmax
                                  double[::1] losses,              # OUT (N,) per-row loss
                                  double label_smoothing, int num_threads):
    """Fill probs and per-row losses; return the mean loss (summed in row order)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    cdef Py_ssize_t n, j
    cdef double top, total, weighted, log_sum_exp, e
    cdef double mean = 0
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            top = logits[n, 0]
            for j in range(1, C):
                if logits[n, j] > top:
                    top = logits[n, j]
            total = 0
            weighted = 0
            for j in range(C):
                e = exp(logits[n, j] - top)
                probs[n, j] = <floating> e
                total = total + e
                if label_smoothing > 0:
                    weighted = weighted + logits[n, j]
            for j in range(C):
                probs[n, j] = <floating> (probs[n, j] / total)
            log_sum_exp = top + log(total)
            losses[n] = log_sum_exp - (1 - label_smoothing) * logits[n, labels[n]]
            if label_smoothing > 0:
                losses[n] = losses[n] - label_smoothing / C * weighted
        for n in range(N):
            mean += losses[n]
    return mean / N


def softmax_cross_entropy_backward(const floating[:, ::1] probs,   # IN  (N, C)
                                   const int64_t[::1] labels,      # IN  (N,)
                                   floating[:, ::1] grad_logits,   # OUT (N, C)
                                   double label_smoothing, int num_threads):
    """grad_logits = (probs - target) / N."""
    cdef Py_ssize_t N = probs.shape[0], C = probs.shape[1]
    cdef Py_ssize_t n, j
    cdef double off_target = label_smoothing / C
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            for j in range(C):
                grad_logits[n, j] = <floating> ((probs[n, j] - off_target) / N)
            grad_logits[n, labels[n]] = <floating> (
                (probs[n, labels[n]] - off_target - (1 - label_smoothing)) / N)
