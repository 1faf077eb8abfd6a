/* Loops over one contiguous run of n elements, shared by the batch-norm,
 * convolution, pooling and activation kernels: sums in double precision, the
 * ReLU masks of a gradient, and batch norm's per-channel affine maps.
 *
 * They are memory-bound on AVX2 or AVX-512 and compute-bound on baseline
 * x86-64's SSE2 (two doubles per instruction): CYCONV_MULTIVERSION_EXACT
 * (_multiversion.h) gives each a wide-vector clone that rounds exactly as the
 * baseline does.
 *
 * The sums keep 8 independent accumulators: a single running sum is one long
 * chain of dependent additions (latency-bound, ~4 cycles each); eight chains
 * overlap, and they are the 8 lanes of one AVX-512 vector of doubles.  The
 * order of the additions is fixed by n alone, so results never depend on the
 * thread count.
 */
#ifndef CYCONV_RUNS_H
#define CYCONV_RUNS_H
#include <stddef.h>

#include "_multiversion.h"

/* sum_i TERM(i) over 8 accumulators, for the body of a function with n; acc is
 * double, so TERM is evaluated in double precision */
#define CYCONV_EIGHT_ACCUMULATORS(TERM)                                                      \
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                \
    ptrdiff_t i = 0;                                                                         \
    for (; i + 8 <= n; i += 8)                                                               \
        for (int j = 0; j < 8; j++)                                                          \
            acc[j] += TERM(i + j);                                                           \
    for (; i < n; i++)                                                                       \
        acc[0] += TERM(i);                                                                   \
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))

#define CYCONV_VALUE(i) ((double)x[i])
#define CYCONV_SQUARED_DEVIATION(i) (((double)x[i] - center) * ((double)x[i] - center))
#define CYCONV_PRODUCT_CENTERED(i) ((double)a[i] * ((double)x[i] - center))

#define CYCONV_RUNS(T)                                                                       \
    /* sum_i x[i] */                                                                        \
    static CYCONV_MULTIVERSION_EXACT double sum_run_##T(const T *x, ptrdiff_t n)             \
    {                                                                                        \
        CYCONV_EIGHT_ACCUMULATORS(CYCONV_VALUE);                                             \
    }                                                                                        \
    /* sum_i (x[i] - center)^2 */                                                           \
    static CYCONV_MULTIVERSION_EXACT double sum_squared_deviation_##T(const T *x,            \
                                                                      ptrdiff_t n,           \
                                                                      double center)         \
    {                                                                                        \
        CYCONV_EIGHT_ACCUMULATORS(CYCONV_SQUARED_DEVIATION);                                 \
    }                                                                                        \
    /* sum_i a[i] * (x[i] - center) */                                                      \
    static CYCONV_MULTIVERSION_EXACT double sum_product_centered_##T(                        \
        const T *a, const T *x, ptrdiff_t n, double center)                                  \
    {                                                                                        \
        CYCONV_EIGHT_ACCUMULATORS(CYCONV_PRODUCT_CENTERED);                                  \
    }                                                                                        \
    /* masked = grad where out > 0, else 0: the gradient of max(., 0) from its output.     \
     * grad is loaded either way, so the select needs no branch (a branch on the sign of   \
     * activations mispredicts about half the time).  masked may be grad itself. */        \
    static CYCONV_MULTIVERSION_EXACT void relu_mask_run_##T(const T *grad, const T *out,     \
                                                            T *masked, ptrdiff_t n)          \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++) {                                                  \
            T g = grad[i];                                                                   \
            masked[i] = out[i] > 0 ? g : (T)0;                                               \
        }                                                                                    \
    }                                                                                        \
    /* masked = grad where 0 < out < 6, else 0: the gradient of ReLU6 from its output */   \
    static CYCONV_MULTIVERSION_EXACT void relu6_mask_run_##T(const T *grad, const T *out,    \
                                                             T *masked, ptrdiff_t n)         \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++) {                                                  \
            T g = grad[i];                                                                   \
            masked[i] = (out[i] > 0) & (out[i] < 6) ? g : (T)0;                              \
        }                                                                                    \
    }                                                                                        \
    /* out = x * scale + shift, then the activation of code act (_activate.h; NaN kept),   \
     * in the array's precision; act is a constant in each loop, so that each vectorises */ \
    static CYCONV_MULTIVERSION_EXACT void affine_run_##T(const T *x, T *out, ptrdiff_t n,    \
                                                         T scale, T shift, int act)          \
    {                                                                                        \
        if (act == 1)                                                                        \
            for (ptrdiff_t i = 0; i < n; i++)                                                \
                out[i] = CYCONV_ACTIVATE(x[i] * scale + shift, 1);                           \
        else if (act == 2)                                                                   \
            for (ptrdiff_t i = 0; i < n; i++)                                                \
                out[i] = CYCONV_ACTIVATE(x[i] * scale + shift, 2);                           \
        else                                                                                 \
            for (ptrdiff_t i = 0; i < n; i++)                                                \
                out[i] = x[i] * scale + shift;                                               \
    }                                                                                        \
    /* out = a * dy + b * x + c (out may be dy itself) */                                  \
    static CYCONV_MULTIVERSION_EXACT void combine_run_##T(const T *dy, const T *x, T *out,   \
                                                          ptrdiff_t n, T a, T b, T c)        \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            out[i] = a * dy[i] + b * x[i] + c;                                               \
    }

#include "_activate.h"

CYCONV_RUNS(float)
CYCONV_RUNS(double)

#include "_typed.h"
#define sum_run(x, ...) CYCONV_TYPED(sum_run, x, __VA_ARGS__)
#define sum_squared_deviation(x, ...) CYCONV_TYPED(sum_squared_deviation, x, __VA_ARGS__)
#define sum_product_centered(a, ...) CYCONV_TYPED(sum_product_centered, a, __VA_ARGS__)
#define relu_mask_run(grad, ...) CYCONV_TYPED(relu_mask_run, grad, __VA_ARGS__)
#define relu6_mask_run(grad, ...) CYCONV_TYPED(relu6_mask_run, grad, __VA_ARGS__)
#define affine_run(x, ...) CYCONV_TYPED(affine_run, x, __VA_ARGS__)
#define combine_run(dy, ...) CYCONV_TYPED(combine_run, dy, __VA_ARGS__)

#endif
