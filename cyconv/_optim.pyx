"""Optimizer update rules over flat parameter arrays, elementwise (PyTorch's semantics).

Every element is updated independently (prange, 'guided' schedule), so results
do not depend on the thread count.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt


def sgd_step(floating[::1] param,             # INOUT (M,)
             const floating[::1] grad,        # IN    (M,)
             floating[::1] momentum_buffer,   # INOUT (M,); empty when momentum == 0
             double lr, double momentum, double dampening, double weight_decay,
             bint nesterov, bint first_step, int num_threads):
    """d = g + wd*p;  buf = d (first step) or momentum*buf + (1 - dampening)*d;
    d = d + momentum*buf (Nesterov) or buf;  p -= lr*d."""
    cdef Py_ssize_t i
    cdef floating d
    cdef bint use_momentum = momentum != 0
    for i in prange(param.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        d = grad[i]
        if weight_decay != 0:
            d = d + <floating> weight_decay * param[i]
        if use_momentum:
            if first_step:
                momentum_buffer[i] = d
            else:
                momentum_buffer[i] = (<floating> momentum * momentum_buffer[i]
                                      + <floating> (1 - dampening) * d)
            if nesterov:
                d = d + <floating> momentum * momentum_buffer[i]
            else:
                d = momentum_buffer[i]
        param[i] = param[i] - <floating> lr * d


def adam_step(floating[::1] param,          # INOUT (M,)
              const floating[::1] grad,     # IN    (M,)
              floating[::1] exp_avg,        # INOUT (M,) first moment
              floating[::1] exp_avg_sq,     # INOUT (M,) second moment
              double lr, double beta1, double beta2, double eps, double weight_decay,
              bint decoupled_weight_decay, long step, int num_threads):
    """Adam (weight decay added to the gradient) or AdamW (decoupled: p *= 1 - lr*wd).

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    cdef Py_ssize_t i
    cdef floating g
    cdef double bias_correction1 = 1 - beta1 ** step
    cdef double bias_correction2_sqrt = sqrt(1 - beta2 ** step)
    cdef floating step_size = <floating> (lr / bias_correction1)
    cdef floating decay = <floating> (1 - lr * weight_decay)
    for i in prange(param.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        g = grad[i]
        if decoupled_weight_decay:
            param[i] = param[i] * decay
        elif weight_decay != 0:
            g = g + <floating> weight_decay * param[i]
        exp_avg[i] = <floating> beta1 * exp_avg[i] + <floating> (1 - beta1) * g
        exp_avg_sq[i] = <floating> beta2 * exp_avg_sq[i] + <floating> (1 - beta2) * g * g
        param[i] = param[i] - step_size * exp_avg[i] / (
            <floating> (sqrt(exp_avg_sq[i]) / bias_correction2_sqrt) + <floating> eps)


def moving_average_step(floating[::1] average,    # INOUT (M,)
                        const floating[::1] value,  # IN    (M,)
                        double decay, int num_threads):
    """average = decay * average + (1 - decay) * value."""
    cdef Py_ssize_t i
    cdef floating keep = <floating> decay, take = <floating> (1 - decay)
    for i in prange(average.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        average[i] = keep * average[i] + take * value[i]
