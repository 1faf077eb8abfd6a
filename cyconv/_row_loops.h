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
    static inline int max_pool_2x2_row_##T(const T *__restrict top,                      \
                                           const T *__restrict bottom,                   \
                                           T *__restrict out, int *__restrict where,     \
                                           ptrdiff_t n, int first, int W)                \
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
    /* The gradient of that max-pool for two input rows: the input where[i] points to   \
     * gets grad[i], the 3 others of its window 0.  Every input of the n windows is     \
     * written once, so the rows need no zero fill first. */                            \
    static inline void max_pool_2x2_backward_row_##T(const T *__restrict grad,           \
                                                     const int *__restrict where,        \
                                                     T *__restrict top,                  \
                                                     T *__restrict bottom,               \
                                                     ptrdiff_t n, int first, int W)      \
    {                                                                                    \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            int offset = where[i] - (first + 2 * (int)i);                                \
            T g = grad[i];                                                               \
            top[2 * i] = offset == 0 ? g : (T)0;                                         \
            top[2 * i + 1] = offset == 1 ? g : (T)0;                                     \
            bottom[2 * i] = offset == W ? g : (T)0;                                      \
            bottom[2 * i + 1] = offset == W + 1 ? g : (T)0;                              \
        }                                                                                \
    }

CYCONV_ROW_LOOPS(float)
CYCONV_ROW_LOOPS(double)

#include "_typed.h"
#define gather_stride2(dst, ...) CYCONV_TYPED(gather_stride2, dst, __VA_ARGS__)
#define scatter_add_stride2(dst, ...) CYCONV_TYPED(scatter_add_stride2, dst, __VA_ARGS__)
#define max_pool_2x2_row(top, ...) CYCONV_TYPED(max_pool_2x2_row, top, __VA_ARGS__)
#define max_pool_2x2_backward_row(grad, ...) \
    CYCONV_TYPED(max_pool_2x2_backward_row, grad, __VA_ARGS__)

#endif
