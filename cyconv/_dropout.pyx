"""Inverted dropout kernels over flat arrays.

The keep/drop decision for element i is a pure function of (seed, i): a
splitmix64 hash turned into a uniform number in [0, 1).  No random state is
shared between threads, so the mask is the same for any thread count, and a
given seed always draws the same mask.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint64_t, uint8_t

cdef uint64_t GOLDEN_GAMMA = 0x9E3779B97F4A7C15
cdef uint64_t MIX_1 = 0xBF58476D1CE4E5B9
cdef uint64_t MIX_2 = 0x94D049BB133111EB


cdef inline double uniform(uint64_t seed, uint64_t i) noexcept nogil:
    """The i-th number of the splitmix64 stream started at seed, in [0, 1)."""
    cdef uint64_t z = seed + (i + 1) * GOLDEN_GAMMA
    z = (z ^ (z >> 30)) * MIX_1
    z = (z ^ (z >> 27)) * MIX_2
    z = z ^ (z >> 31)
    return (z >> 11) * (1.0 / 9007199254740992.0)   # top 53 bits / 2^53


def dropout_forward(const floating[::1] x,   # IN  (M,)
                    floating[::1] out,       # OUT (M,)
                    uint8_t[::1] mask,       # OUT (M,) 1 = kept
                    double p, uint64_t seed, int num_threads):
    """out = x * mask / (1 - p), with each element kept with probability 1 - p."""
    cdef Py_ssize_t i
    cdef floating scale = <floating> (1.0 / (1.0 - p))
    for i in prange(x.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        mask[i] = uniform(seed, i) >= p
        out[i] = x[i] * (scale * mask[i])


def dropout_backward(const floating[::1] grad_out,   # IN  (M,)
                     const uint8_t[::1] mask,        # IN  (M,)
                     floating[::1] grad_input,       # OUT (M,)
                     double p, int num_threads):
    """grad_input = grad_out * mask / (1 - p)."""
    cdef Py_ssize_t i
    cdef floating scale = <floating> (1.0 / (1.0 - p))
    for i in prange(grad_out.shape[0], nogil=True, schedule='guided', num_threads=num_threads):
        grad_input[i] = grad_out[i] * (scale * mask[i])   # no branch on the random mask
