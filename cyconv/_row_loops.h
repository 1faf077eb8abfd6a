/* Row loops written in C so that the compiler vectorises them.
 *
 * Here the pointers can be declared __restrict and indexed with a
 * pointer-sized integer.  The same loops written in Cython compiled to scalar
 * code (one element per cycle): im2col's stride-2 copy alone was a fifth of a
 * training step of the reference network, whose convolutions all have
 * stride 2.  In every call the destination never overlaps a source (an image
 * and a column tile, or an input and an output plane).
 */
#ifndef CYCONV_ROW_LOOPS_H
#define CYCONV_ROW_LOOPS_H
#include <stddef.h>
#include <string.h>

/* The kernels of the pooling and batch-norm + max-pool rows are multiversioned
 * (_multiversion.h): functions of their own, so their __restrict pointers keep
 * telling GCC that the rows do not overlap (inlined into a caller's parallel loop,
 * the 2x2 max-pool's loop had stayed scalar, 4x slower), and wide-vector clones
 * that round as the baseline does. */
#include "_multiversion.h"

/* v takes the place of best in a max-pool window when greater or, with nan_wins, when
 * it is the window's first NaN (a NaN wins, as in PyTorch).  Written with || and &&
 * so that GCC vectorises the selects (bitwise | and & kept the loop scalar). */
#define CYCONV_TAKES(v, best, nan_wins) \
    ((v) > (best) || ((nan_wins) && (v) != (v) && (best) == (best)))

/* The loop of max_pool_tap for one stride and with or without where (constants at
 * each use, so that GCC vectorises each copy; where's select is written with a
 * mask: as a ?: it kept the loop scalar). */
#define CYCONV_MAX_POOL_TAP(T, STRIDE, STORE_WHERE)                                      \
    for (ptrdiff_t i = 0; i < n; i++) {                                                  \
        T v = src[(STRIDE) * i], best = out[i];                                          \
        int takes = -(v > best);                                                         \
        if (STORE_WHERE)                                                                 \
            where[i] = ((first + (STRIDE) * (int)i) & takes) | (where[i] & ~takes);      \
        out[i] = v > best ? v : best;                                                    \
        has_nan |= v != v;                                                               \
    }

#define CYCONV_ROW_LOOPS(T)                                                              \
    /* im2col, stride 2: dst[i] = src[2 i], i < n */                                    \
    static inline void gather_stride2_##T(T *__restrict dst, const T *__restrict src,    \
                                          ptrdiff_t n)                                   \
    {                                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[2 * i];                           \
    }                                                                                    \
    /* col2im, stride 2: dst[2 i] += src[i], i < n */                                   \
    static inline void scatter_add_stride2_##T(T *__restrict dst,                        \
                                               const T *__restrict src, ptrdiff_t n)     \
    {                                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) dst[2 * i] += src[i];                          \
    }                                                                                    \
    /* One output row of a 2x2 max-pool with stride 2 over input rows top and bottom:   \
     * out[i] = max(top[2i], top[2i+1], bottom[2i], bottom[2i+1]) and, unless where is  \
     * NULL, where[i] = the flat index of the first maximum, first + 2i + (0, 1, W or   \
     * W+1).  Selects, not branches (the winner is random).  Returns nonzero when a     \
     * window held a NaN: the caller redoes the row, since a NaN must win. */          \
    static CYCONV_MULTIVERSION_EXACT int max_pool_2x2_row_##T(const T *__restrict top,   \
                                                    const T *__restrict bottom,          \
                                                    T *__restrict out,                   \
                                                    int *__restrict where, ptrdiff_t n,  \
                                                    int first, int W)                    \
    {                                                                                    \
        int has_nan = 0;                                                                 \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            T a = top[2 * i], b = top[2 * i + 1], c = bottom[2 * i], d = bottom[2 * i + 1]; \
            T best = a;                                                                  \
            int offset = 0;                                                              \
            offset = b > best ? 1 : offset;                                              \
            best = b > best ? b : best;                                                  \
            offset = c > best ? W : offset;                                              \
            best = c > best ? c : best;                                                  \
            offset = d > best ? W + 1 : offset;                                          \
            best = d > best ? d : best;                                                  \
            has_nan |= (a != a) | (b != b) | (c != c) | (d != d);                        \
            out[i] = best;                                                               \
            if (where) where[i] = first + 2 * (int)i + offset;                           \
        }                                                                                \
        return has_nan;                                                                  \
    }                                                                                    \
    /* One tap of n max-pool windows side by side in a row, stride apart: v =          \
     * src[stride i] takes out[i] when greater, and then where[i] = first + stride i    \
     * (where may be NULL).  Taps applied in each window's row-major order keep its    \
     * first maximum.  Returns nonzero when a v was a NaN: the caller redoes the row,   \
     * since a NaN must win. */                                                         \
    static inline int max_pool_tap_##T(const T *__restrict src, T *__restrict out,       \
                                       int *__restrict where, ptrdiff_t n, int stride,   \
                                       int first)                                        \
    {                                                                                    \
        int has_nan = 0;                                                                 \
        if (stride == 2 && where)                                                        \
            CYCONV_MAX_POOL_TAP(T, 2, 1)                                                 \
        else if (stride == 2)                                                            \
            CYCONV_MAX_POOL_TAP(T, 2, 0)                                                 \
        else if (where)                                                                  \
            CYCONV_MAX_POOL_TAP(T, stride, 1)                                            \
        else                                                                             \
            CYCONV_MAX_POOL_TAP(T, stride, 0)                                            \
        return has_nan;                                                                  \
    }                                                                                    \
    /* The gradient of that max-pool for two input rows: the input where[i] points to   \
     * gets grad[i], the 3 others of its window 0.  Every input of the n windows is     \
     * written once, so the rows need no zero fill first. */                            \
    static CYCONV_MULTIVERSION_EXACT void max_pool_2x2_backward_row_##T(                 \
        const T *__restrict grad, const int *__restrict where, T *__restrict top,        \
        T *__restrict bottom, ptrdiff_t n, int first, int W)                             \
    {                                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            int offset = where[i] - (first + 2 * (int)i);                                \
            T g = grad[i];                                                               \
            top[2 * i] = offset == 0 ? g : (T)0;                                         \
            top[2 * i + 1] = offset == 1 ? g : (T)0;                                     \
            bottom[2 * i] = offset == W ? g : (T)0;                                      \
            bottom[2 * i + 1] = offset == W + 1 ? g : (T)0;                              \
        }                                                                                \
    }                                                                                    \
    /* max_pool_2x2_row of y = max(x * scale + shift, 0) (NaN kept): batch norm, ReLU   \
     * and max-pool in one sweep, y never stored; returns nonzero when a y was a NaN.   \
     * With nan_wins the selects let a NaN win its window (CYCONV_TAKES), at the price \
     * of a few more operations.  store_where and nan_wins are constants at each call  \
     * (see below): with a test of them inside, GCC leaves the loop scalar. */         \
    CYCONV_ALWAYS_INLINE int affine_relu_max_pool_2x2_loop_##T(                          \
        const T *__restrict top, const T *__restrict bottom, T *__restrict out,          \
        int *__restrict where, ptrdiff_t n, int first, int W, T scale, T shift,          \
        int store_where, int nan_wins)                                                   \
    {                                                                                    \
        int has_nan = 0;                                                                 \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            T a = top[2 * i] * scale + shift, b = top[2 * i + 1] * scale + shift;        \
            T c = bottom[2 * i] * scale + shift, d = bottom[2 * i + 1] * scale + shift;  \
            has_nan |= (a != a) | (b != b) | (c != c) | (d != d); /* before the ReLU */  \
            a = a <= 0 ? 0 : a;                                                          \
            b = b <= 0 ? 0 : b;                                                          \
            c = c <= 0 ? 0 : c;                                                          \
            d = d <= 0 ? 0 : d;                                                          \
            T best = a;                                                                  \
            int offset = 0;                                                              \
            offset = CYCONV_TAKES(b, best, nan_wins) ? 1 : offset;                       \
            best = CYCONV_TAKES(b, best, nan_wins) ? b : best;                           \
            offset = CYCONV_TAKES(c, best, nan_wins) ? W : offset;                       \
            best = CYCONV_TAKES(c, best, nan_wins) ? c : best;                           \
            offset = CYCONV_TAKES(d, best, nan_wins) ? W + 1 : offset;                   \
            best = CYCONV_TAKES(d, best, nan_wins) ? d : best;                           \
            out[i] = best;                                                               \
            if (store_where) where[i] = first + 2 * (int)i + offset;                     \
        }                                                                                \
        return has_nan;                                                                  \
    }                                                                                    \
    /* One output row, where = NULL when the argmax is not needed: the plain selects,  \
     * and the row again with a NaN's rule when it held one. */                        \
    static CYCONV_MULTIVERSION_EXACT void affine_relu_max_pool_2x2_row_##T(              \
        const T *top, const T *bottom, T *out, int *where, ptrdiff_t n, int first, int W, \
        T scale, T shift)                                                                \
    {                                                                                    \
        if (where ? affine_relu_max_pool_2x2_loop_##T(top, bottom, out, where, n, first, \
                                                      W, scale, shift, 1, 0)             \
                  : affine_relu_max_pool_2x2_loop_##T(top, bottom, out, where, n, first, \
                                                      W, scale, shift, 0, 0)) {          \
            if (where)                                                                   \
                affine_relu_max_pool_2x2_loop_##T(top, bottom, out, where, n, first, W,  \
                                                  scale, shift, 1, 1);                   \
            else                                                                         \
                affine_relu_max_pool_2x2_loop_##T(top, bottom, out, where, n, first, W,  \
                                                  scale, shift, 0, 1);                   \
        }                                                                                \
    }                                                                                    \
    /* Its input gradient for two input rows: dx = k dy + b x + c0 (batch norm's),      \
     * where dy is grad[i] at the input where[i] points to when its window's output     \
     * kept[i] > 0 (the ReLU let it through), else 0, as the max-pool's and the ReLU's  \
     * gradients would give it; the column no window covers (odd W) has dy = 0. */      \
    static CYCONV_MULTIVERSION_EXACT void batch_norm_max_pool_2x2_backward_row_##T(      \
        const T *__restrict grad, const T *__restrict kept, const int *__restrict where, \
        const T *__restrict x_top, const T *__restrict x_bottom, T *__restrict top,      \
        T *__restrict bottom, ptrdiff_t n, int first, int W, T k, T b, T c0)             \
    {                                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            int offset = where[i] - (first + 2 * (int)i);                                \
            T gi = grad[i], zero = 0; /* loaded either way: a select, not a branch */    \
            T g = kept[i] > 0 ? gi : zero;                                               \
            T g0 = offset == 0 ? g : zero, g1 = offset == 1 ? g : zero;                  \
            T g2 = offset == W ? g : zero, g3 = offset == W + 1 ? g : zero;              \
            top[2 * i] = k * g0 + b * x_top[2 * i] + c0;                                 \
            top[2 * i + 1] = k * g1 + b * x_top[2 * i + 1] + c0;                         \
            bottom[2 * i] = k * g2 + b * x_bottom[2 * i] + c0;                           \
            bottom[2 * i + 1] = k * g3 + b * x_bottom[2 * i + 1] + c0;                   \
        }                                                                                \
        if (W > 2 * n) {                                                                 \
            top[2 * n] = k * (T)0 + b * x_top[2 * n] + c0;                               \
            bottom[2 * n] = k * (T)0 + b * x_bottom[2 * n] + c0;                         \
        }                                                                                \
    }

/* The lanes of pooled_gradient_sums over its outputs o + 4 <= n: one GCC vector of 4
 * doubles (GCC's own vectorizer left the loop scalar, for its gather through where) */
#if defined(__GNUC__)
#define CYCONV_POOLED_LANES(T, MASK_T)                                                   \
    {                                                                                    \
        typedef double doubles __attribute__((vector_size(4 * sizeof(double))));        \
        typedef T values __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T))));\
        typedef MASK_T masks __attribute__((vector_size(4 * sizeof(T))));                \
        doubles sum = {0}, sum_x = {0};                                                  \
        for (; o + 4 <= n; o += 4) {                                                     \
            values g = *(const values *)(grad + o), k = *(const values *)(kept + o);     \
            values kept_g = (values)((masks)g & (masks)(k > 0));                         \
            doubles m = __builtin_convertvector(kept_g, doubles);                        \
            doubles v = {plane[where[o]], plane[where[o + 1]], plane[where[o + 2]],      \
                         plane[where[o + 3]]};                                           \
            sum += m;                                                                    \
            sum_x += m * (v - center);                                                   \
        }                                                                                \
        memcpy(dy, &sum, sizeof sum);                                                    \
        memcpy(dy_x, &sum_x, sizeof sum_x);                                              \
    }
#else
#define CYCONV_POOLED_LANES(T, MASK_T)                                                   \
    for (; o + 4 <= n; o += 4)                                                           \
        for (int j = 0; j < 4; j++) {                                                    \
            double m = kept[o + j] > 0 ? grad[o + j] : 0;                                \
            dy[j] += m;                                                                  \
            dy_x[j] += m * ((double)plane[where[o + j]] - center);                       \
        }
#endif

/* *sum_dy += sum dy and *sum_dy_x += sum dy * (x - center) over the n outputs of a
 * pooled plane, where dy is grad[o] at the input plane[where[o]] when kept[o] > 0, else
 * 0: batch norm's sums behind a ReLU and a max-pool.  Lane o % 4 of each sum holds its
 * share (the last n % 4 outputs go to lane 0), added as (0 + 1) + (2 + 3): a fixed
 * order. */
#define CYCONV_POOLED_GRADIENT_SUMS(T, MASK_T)                                           \
    static CYCONV_MULTIVERSION_EXACT void pooled_gradient_sums_##T(                      \
        const T *__restrict grad, const T *__restrict kept, const int *__restrict where, \
        const T *__restrict plane, ptrdiff_t n, double center, double *sum_dy,           \
        double *sum_dy_x)                                                                \
    {                                                                                    \
        double dy[4] = {0, 0, 0, 0}, dy_x[4] = {0, 0, 0, 0};                             \
        ptrdiff_t o = 0;                                                                 \
        CYCONV_POOLED_LANES(T, MASK_T)                                                   \
        for (; o < n; o++) {                                                             \
            double m = kept[o] > 0 ? grad[o] : 0;                                        \
            dy[0] += m;                                                                  \
            dy_x[0] += m * ((double)plane[where[o]] - center);                           \
        }                                                                                \
        *sum_dy += (dy[0] + dy[1]) + (dy[2] + dy[3]);                                    \
        *sum_dy_x += (dy_x[0] + dy_x[1]) + (dy_x[2] + dy_x[3]);                          \
    }

CYCONV_ROW_LOOPS(float)
CYCONV_ROW_LOOPS(double)
CYCONV_POOLED_GRADIENT_SUMS(float, int)
CYCONV_POOLED_GRADIENT_SUMS(double, long long)

#include "_typed.h"
#define gather_stride2(dst, ...) CYCONV_TYPED(gather_stride2, dst, __VA_ARGS__)
#define scatter_add_stride2(dst, ...) CYCONV_TYPED(scatter_add_stride2, dst, __VA_ARGS__)
#define max_pool_2x2_row(top, ...) CYCONV_TYPED(max_pool_2x2_row, top, __VA_ARGS__)
#define max_pool_tap(src, ...) CYCONV_TYPED(max_pool_tap, src, __VA_ARGS__)
#define max_pool_2x2_backward_row(grad, ...) \
    CYCONV_TYPED(max_pool_2x2_backward_row, grad, __VA_ARGS__)
#define affine_relu_max_pool_2x2_row(top, ...) \
    CYCONV_TYPED(affine_relu_max_pool_2x2_row, top, __VA_ARGS__)
#define batch_norm_max_pool_2x2_backward_row(grad, ...) \
    CYCONV_TYPED(batch_norm_max_pool_2x2_backward_row, grad, __VA_ARGS__)
#define pooled_gradient_sums(grad, ...) CYCONV_TYPED(pooled_gradient_sums, grad, __VA_ARGS__)

#endif
