"""Softmax + cross-entropy, fused and numerically stable.

For one row z (C logits) with target probabilities q and smoothing eps, the target is
t = (1 - eps) * q + eps / C and
    loss = logsumexp(z) - sum_j t_j z_j,   logsumexp(z) = m + log(sum_j exp(z_j - m)), m = max z
The batch loss is the mean over rows; its gradient is (softmax(z) - t) / N.
A class label y stands for q = onehot(y) (the *_forward / *_backward pair); the
soft pair takes q as an (N, C) array (mixed images, e.g. CutMix).
As in PyTorch, a logit of -inf for a class other than the target is a class the
model rules out: the loss stays finite without smoothing (a term of the sum over j
is taken only when t_j > 0; with smoothing the loss is then +inf, the gradient finite).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, log
from libc.stdint cimport int64_t


cdef inline double softmax_row(const floating* z, floating* p, Py_ssize_t C) noexcept nogil:
    """p = softmax(z) over C entries; returns logsumexp(z)."""
    cdef Py_ssize_t j
    cdef double top = z[0], total = 0, e
    for j in range(1, C):
        if z[j] > top:
            top = z[j]
    for j in range(C):
        e = exp(z[j] - top)
        p[j] = <floating> e
        total = total + e
    for j in range(C):
        p[j] = <floating> (p[j] / total)
    return top + log(total)


cdef inline double mean_of(const double[::1] losses) noexcept nogil:
    """The mean of the per-row losses, summed in row order."""
    cdef Py_ssize_t n
    cdef double total = 0
    for n in range(losses.shape[0]):
        total += losses[n]
    return total / losses.shape[0]


def softmax_cross_entropy_forward(const floating[:, ::1] logits,   # IN  (N, C)
                                  const int64_t[::1] labels,       # IN  (N,) in [0, C)
                                  floating[:, ::1] probs,          # OUT (N, C) softmax
                                  double[::1] losses,              # OUT (N,) per-row loss
                                  double label_smoothing, int num_threads):
    """Fill probs and per-row losses; return the mean loss."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    cdef Py_ssize_t n, j
    cdef double weighted
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            losses[n] = (softmax_row(&logits[n, 0], &probs[n, 0], C)
                         - (1 - label_smoothing) * logits[n, labels[n]])
            if label_smoothing > 0:
                weighted = 0
                for j in range(C):
                    weighted = weighted + logits[n, j]
                losses[n] = losses[n] - label_smoothing / C * weighted
    return mean_of(losses)


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


def softmax_cross_entropy_soft_forward(const floating[:, ::1] logits,   # IN  (N, C)
                                       const floating[:, ::1] targets,  # IN  (N, C) q, rows sum to 1
                                       floating[:, ::1] probs,          # OUT (N, C) softmax
                                       double[::1] losses,              # OUT (N,) per-row loss
                                       double label_smoothing, int num_threads):
    """Fill probs and per-row losses for target probabilities; return the mean loss."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    cdef Py_ssize_t n, j
    cdef double weight
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            losses[n] = softmax_row(&logits[n, 0], &probs[n, 0], C)
            for j in range(C):
                weight = (1 - label_smoothing) * targets[n, j] + label_smoothing / C
                if weight > 0:
                    losses[n] = losses[n] - weight * logits[n, j]
    return mean_of(losses)


def softmax_cross_entropy_soft_backward(const floating[:, ::1] probs,     # IN  (N, C)
                                        const floating[:, ::1] targets,   # IN  (N, C) q
                                        floating[:, ::1] grad_logits,     # OUT (N, C)
                                        double label_smoothing, int num_threads):
    """grad_logits = (probs - target) / N."""
    cdef Py_ssize_t N = probs.shape[0], C = probs.shape[1]
    cdef Py_ssize_t n, j
    with nogil:
        for n in prange(N, schedule='dynamic', num_threads=num_threads):
            for j in range(C):
                grad_logits[n, j] = <floating> (
                    (probs[n, j] - ((1 - label_smoothing) * targets[n, j]
                                    + label_smoothing / C)) / N)
