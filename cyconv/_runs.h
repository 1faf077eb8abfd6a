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
#include <string.h>

#include "_multiversion.h"

/* The fixed tree in which the 8 lanes of a sum are added at the end */
#define CYCONV_LANE_TREE(lanes) \
    ((((lanes)[0] + (lanes)[1]) + ((lanes)[2] + (lanes)[3])) + \
     (((lanes)[4] + (lanes)[5]) + ((lanes)[6] + (lanes)[7])))

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
    return CYCONV_LANE_TREE(acc)

#define CYCONV_VALUE(i) ((double)x[i])
#define CYCONV_SQUARED_DEVIATION(i) (((double)x[i] - center) * ((double)x[i] - center))

/* A gradient g (already loaded: a select, not a branch on the sign of activations,
 * which mispredicts about half the time) times the derivative of the activation,
 * read from its output out[k]: ReLU's, ReLU6's. */
#define CYCONV_RELU_MASK(g, k) (out[k] > 0 ? (g) : 0)
#define CYCONV_RELU6_MASK(g, k) ((out[k] > 0) & (out[k] < 6) ? (g) : 0)

/* Element i of the gradient sums, added to lane LANE: m = grad[i] masked for the
 * activation of code ACT (0 none, 1 ReLU, 2 ReLU6) and stored in masked unless ACT is
 * 0, then m and m * (x[i] - center) summed in double precision */
#define CYCONV_GRADIENT_TERM(T, ACT, i, LANE)                                                \
    {                                                                                        \
        T m = grad[i];                                                                       \
        if ((ACT) == 1)                                                                      \
            m = CYCONV_RELU_MASK(m, i);                                                      \
        if ((ACT) == 2)                                                                      \
            m = CYCONV_RELU6_MASK(m, i);                                                     \
        if (ACT)                                                                             \
            masked[i] = m;                                                                   \
        lanes_m[LANE] += (double)m;                                                          \
        lanes_mx[LANE] += (double)m * ((double)x[i] - center);                               \
    }

/* masked = grad times the derivative MASK of an activation read from its output (masked
 * may be grad itself) */
#define CYCONV_MASK_RUN(T, NAME, MASK)                                                       \
    static CYCONV_MULTIVERSION_EXACT void NAME##_##T(const T *grad, const T *out, T *masked, \
                                                     ptrdiff_t n)                            \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++) {                                                  \
            T g = grad[i];                                                                   \
            masked[i] = MASK(g, i);                                                          \
        }                                                                                    \
    }

#if defined(__GNUC__)
/* The lanes of a vector of activation outputs o whose gradient passes: o > 0 (ACT 1,
 * ReLU), 0 < o < 6 (ACT 2, ReLU6) */
#define CYCONV_KEEP_MASK(ints, o, ACT) \
    ((ACT) == 1 ? (ints)((o) > 0) : (ints)((o) > 0) & (ints)((o) < 6))
/* The gradient sums' loop on GCC vectors (GCC's own vectorizer left it scalar): lane j
 * of the 8 holds elements 8 b + j, as in sum_run, kept as two vectors of 4 doubles
 * (lanes 0-3 and 4-7: one AVX2 register each; GCC kept a vector of 8 doubles on the
 * stack on AVX2, stored and reloaded at every step).  ACT is a constant in each copy: 0
 * none, 1 ReLU, 2 ReLU6. */
#define CYCONV_GRADIENT_SUMS(T, MASK_T, ACT)                                                 \
    {                                                                                        \
        typedef T vec __attribute__((vector_size(4 * sizeof(T))));                           \
        typedef MASK_T ints __attribute__((vector_size(4 * sizeof(T))));                     \
        typedef double doubles __attribute__((vector_size(4 * sizeof(double))));             \
        doubles m_low = {0}, m_high = {0}, mx_low = {0}, mx_high = {0};                      \
        double lanes_m[8], lanes_mx[8];                                                      \
        ptrdiff_t i = 0;                                                                     \
        for (; i + 8 <= n; i += 8) {                                                         \
            /* (each half a vector of its own: as arrays, GCC kept them on the stack) */     \
            vec g0, g1, x0, x1;                                                              \
            memcpy(&g0, grad + i, sizeof g0);                                                \
            memcpy(&g1, grad + i + 4, sizeof g1);                                            \
            memcpy(&x0, x + i, sizeof x0);                                                   \
            memcpy(&x1, x + i + 4, sizeof x1);                                               \
            if (ACT) {                                                                       \
                vec o0, o1;                                                                  \
                memcpy(&o0, out + i, sizeof o0);                                             \
                memcpy(&o1, out + i + 4, sizeof o1);                                         \
                g0 = (vec)((ints)g0 & CYCONV_KEEP_MASK(ints, o0, ACT));                      \
                g1 = (vec)((ints)g1 & CYCONV_KEEP_MASK(ints, o1, ACT));                      \
                memcpy(masked + i, &g0, sizeof g0);                                          \
                memcpy(masked + i + 4, &g1, sizeof g1);                                      \
            }                                                                                \
            doubles low = __builtin_convertvector(g0, doubles);                              \
            doubles high = __builtin_convertvector(g1, doubles);                             \
            m_low += low;                                                                    \
            m_high += high;                                                                  \
            mx_low += low * (__builtin_convertvector(x0, doubles) - center);                 \
            mx_high += high * (__builtin_convertvector(x1, doubles) - center);               \
        }                                                                                    \
        memcpy(lanes_m, &m_low, sizeof m_low);                                               \
        memcpy(lanes_m + 4, &m_high, sizeof m_high);                                         \
        memcpy(lanes_mx, &mx_low, sizeof mx_low);                                            \
        memcpy(lanes_mx + 4, &mx_high, sizeof mx_high);                                      \
        for (; i < n; i++)                                                                   \
            CYCONV_GRADIENT_TERM(T, ACT, i, 0)                                               \
        *sum_m = CYCONV_LANE_TREE(lanes_m);                                                  \
        *sum_mx = CYCONV_LANE_TREE(lanes_mx);                                                \
    }
#else
#define CYCONV_GRADIENT_SUMS(T, MASK_T, ACT)                                                 \
    {                                                                                        \
        double lanes_m[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                        \
        double lanes_mx[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                       \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            CYCONV_GRADIENT_TERM(T, ACT, i, i < n - n % 8 ? i % 8 : 0)                       \
        *sum_m = CYCONV_LANE_TREE(lanes_m);                                                  \
        *sum_mx = CYCONV_LANE_TREE(lanes_mx);                                                \
    }
#endif

/* out[i] = the activation of code act (_activate.h) of VALUE, for i < n; act is a
 * constant in each loop, so that each vectorises */
#define CYCONV_ACTIVATED_LOOPS(VALUE)                                                        \
    if (act == 1)                                                                            \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            out[i] = CYCONV_ACTIVATE(VALUE, 1);                                              \
    else if (act == 2)                                                                       \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            out[i] = CYCONV_ACTIVATE(VALUE, 2);                                              \
    else                                                                                     \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            out[i] = VALUE;

#define CYCONV_RUNS(T, MASK_T)                                                               \
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
    /* the gradients of max(., 0) and of ReLU6 from their outputs */                     \
    CYCONV_MASK_RUN(T, relu_mask_run, CYCONV_RELU_MASK)                                      \
    CYCONV_MASK_RUN(T, relu6_mask_run, CYCONV_RELU6_MASK)                                    \
    /* out = x * scale + shift, then the activation of code act (_activate.h; NaN kept),   \
     * in the array's precision */                                                          \
    static CYCONV_MULTIVERSION_EXACT void affine_run_##T(const T *x, T *out, ptrdiff_t n,    \
                                                         T scale, T shift, int act)          \
    {                                                                                        \
        CYCONV_ACTIVATED_LOOPS(x[i] * scale + shift)                                         \
    }                                                                                        \
    /* out = (x * scale + shift) + addend, then the activation, each step rounded to the   \
     * array's precision (an affine map and a residual sum, in one pass) */                 \
    static CYCONV_MULTIVERSION_EXACT void affine_add_run_##T(const T *x, const T *addend,    \
                                                             T *out, ptrdiff_t n, T scale,   \
                                                             T shift, int act)               \
    {                                                                                        \
        CYCONV_ACTIVATED_LOOPS((T)(x[i] * scale + shift) + addend[i])                        \
    }                                                                                        \
    /* sum_i m[i] in *sum_m and sum_i m[i] * (x[i] - center) in *sum_mx, each in          \
     * sum_run's order, in one sweep: m = grad masked by the derivative of the activation  \
     * of code act (_activate.h) read from out, and stored in masked (with act 0:          \
     * m = grad, and neither out nor masked is read) */                                    \
    static CYCONV_MULTIVERSION_EXACT void gradient_sums_run_##T(                             \
        const T *grad, const T *out, const T *x, T *masked, ptrdiff_t n, double center,     \
        int act, double *sum_m, double *sum_mx)                                              \
    {                                                                                        \
        if (act == 1)                                                                        \
            CYCONV_GRADIENT_SUMS(T, MASK_T, 1)                                               \
        else if (act == 2)                                                                   \
            CYCONV_GRADIENT_SUMS(T, MASK_T, 2)                                               \
        else                                                                                 \
            CYCONV_GRADIENT_SUMS(T, MASK_T, 0)                                               \
    }                                                                                        \
    /* out = a * dy + b * x + c (out may be dy itself) */                                  \
    static CYCONV_MULTIVERSION_EXACT void combine_run_##T(const T *dy, const T *x, T *out,   \
                                                          ptrdiff_t n, T a, T b, T c)        \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++)                                                    \
            out[i] = a * dy[i] + b * x[i] + c;                                               \
    }

#include "_activate.h"

CYCONV_RUNS(float, int)
CYCONV_RUNS(double, long long)

#include "_typed.h"
#define sum_run(x, ...) CYCONV_TYPED(sum_run, x, __VA_ARGS__)
#define sum_squared_deviation(x, ...) CYCONV_TYPED(sum_squared_deviation, x, __VA_ARGS__)
#define relu_mask_run(grad, ...) CYCONV_TYPED(relu_mask_run, grad, __VA_ARGS__)
#define relu6_mask_run(grad, ...) CYCONV_TYPED(relu6_mask_run, grad, __VA_ARGS__)
#define affine_run(x, ...) CYCONV_TYPED(affine_run, x, __VA_ARGS__)
#define affine_add_run(x, ...) CYCONV_TYPED(affine_add_run, x, __VA_ARGS__)
#define combine_run(dy, ...) CYCONV_TYPED(combine_run, dy, __VA_ARGS__)
#define gradient_sums_run(grad, ...) CYCONV_TYPED(gradient_sums_run, grad, __VA_ARGS__)

#endif
