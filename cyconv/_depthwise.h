/* Depthwise convolution, the gradients of one plane (see _depthwise.pyx for the layout).
 *
 * rows is one input plane prepared as for the direct kernel (_direct_conv.h):
 * padded, split by stride phase, so that tap t of output row oh is the
 * contiguous run rows + oh * row_step + tap_offset[t].  Then
 *
 *   depthwise_weight_grad: sums[t] += sum_{oh, ow} dy[oh * OW + ow] * run_t(oh)[ow]
 *   depthwise_scatter_row: run_t(oh)[ow] += weight[t] * dy_row[ow], every tap t
 *
 * The weight gradient keeps DEPTHWISE_TAP_BLOCK taps' sums in vector registers
 * while it streams through the plane once per block, and adds each sum's lanes
 * in order in double precision at the end: a fixed order of additions.  A run
 * is read only up to column OW (a tap may reach input columns that no window
 * covers, and inf * 0 would be NaN).
 */
#ifndef CYCONV_DEPTHWISE_H
#define CYCONV_DEPTHWISE_H
#include "_direct_conv.h"

#define DEPTHWISE_TAP_BLOCK 9

#if DIRECT_VECTORIZED
#define DEPTHWISE_REST(T, n) \
    case n: depthwise_grad_block_##T(dy, rows, tap_offset + t, OH, OW, row_step, sums + t, n); break;
#define CYCONV_DEPTHWISE_GRAD(T)                                                             \
    /* *v <- the first columns (<= DIRECT_COLUMNS) of src, zero beyond */                  \
    static inline __attribute__((always_inline)) void depthwise_load_##T(vec_##T *v,          \
                                                                        const T *src,        \
                                                                        int columns)         \
    {                                                                                        \
        if (columns == DIRECT_COLUMNS) {                                                     \
            *v = *(const vec_##T *)src;                                                      \
        } else {                                                                             \
            *v = (vec_##T){0};                                                               \
            memcpy(v, src, columns * sizeof(T));                                             \
        }                                                                                    \
    }                                                                                        \
    /* taps (a constant after inlining) taps' sums */                                       \
    static inline __attribute__((always_inline)) void depthwise_grad_block_##T(              \
        const T *dy, const T *rows, const ptrdiff_t *tap_offset, int OH, int OW,             \
        ptrdiff_t row_step, double *sums, const int taps)                                    \
    {                                                                                        \
        vec_##T acc[DEPTHWISE_TAP_BLOCK];                                                    \
        for (int t = 0; t < taps; t++)                                                       \
            acc[t] = (vec_##T){0};                                                           \
        for (int oh = 0; oh < OH; oh++) {                                                    \
            const T *dy_row = dy + (ptrdiff_t)oh * OW, *x_row = rows + oh * row_step;        \
            for (int ow0 = 0; ow0 < OW; ow0 += DIRECT_COLUMNS) {                             \
                int columns = OW - ow0 < DIRECT_COLUMNS ? OW - ow0 : DIRECT_COLUMNS;         \
                vec_##T grad, run;                                                           \
                depthwise_load_##T(&grad, dy_row + ow0, columns);                            \
                for (int t = 0; t < taps; t++) {                                             \
                    depthwise_load_##T(&run, x_row + tap_offset[t] + ow0, columns);          \
                    acc[t] += grad * run;                                                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int t = 0; t < taps; t++) {                                                     \
            double total = 0;                                                                \
            for (int i = 0; i < DIRECT_COLUMNS; i++)                                         \
                total += acc[t][i];                                                          \
            sums[t] += total;                                                                \
        }                                                                                    \
    }                                                                                        \
    CYCONV_MULTIVERSION                                                                      \
    static void depthwise_weight_grad_##T(const T *dy, const T *rows,                        \
                                          const ptrdiff_t *tap_offset, int taps, int OH,     \
                                          int OW, ptrdiff_t row_step, double *sums)          \
    {                                                                                        \
        int t = 0;                                                                           \
        for (; t + DEPTHWISE_TAP_BLOCK <= taps; t += DEPTHWISE_TAP_BLOCK)                    \
            depthwise_grad_block_##T(dy, rows, tap_offset + t, OH, OW, row_step, sums + t,   \
                                     DEPTHWISE_TAP_BLOCK);                                   \
        switch (taps - t) { /* the rest, its count a constant in each case */                \
            DEPTHWISE_REST(T, 1) DEPTHWISE_REST(T, 2) DEPTHWISE_REST(T, 3)                   \
            DEPTHWISE_REST(T, 4) DEPTHWISE_REST(T, 5) DEPTHWISE_REST(T, 6)                   \
            DEPTHWISE_REST(T, 7) DEPTHWISE_REST(T, 8)                                        \
        }                                                                                    \
    }
#else
/* Other compilers: plain loops, one tap at a time. */
#define CYCONV_DEPTHWISE_GRAD(T)                                                             \
    static void depthwise_weight_grad_##T(const T *dy, const T *rows,                        \
                                          const ptrdiff_t *tap_offset, int taps, int OH,     \
                                          int OW, ptrdiff_t row_step, double *sums)          \
    {                                                                                        \
        for (int t = 0; t < taps; t++) {                                                     \
            double total = 0;                                                                \
            for (int oh = 0; oh < OH; oh++)                                                  \
                for (int ow = 0; ow < OW; ow++)                                              \
                    total += dy[(ptrdiff_t)oh * OW + ow] *                                   \
                             rows[oh * row_step + tap_offset[t] + ow];                       \
            sums[t] += total;                                                                \
        }                                                                                    \
    }
#endif

#define CYCONV_DEPTHWISE_SCATTER(T)                                                          \
    CYCONV_MULTIVERSION                                                                      \
    static void depthwise_scatter_row_##T(T *__restrict rows, const ptrdiff_t *tap_offset,   \
                                          const T *weight, int taps,                         \
                                          const T *__restrict dy_row, int OW)                \
    {                                                                                        \
        for (int t = 0; t < taps; t++) {                                                     \
            T w = weight[t];                                                                 \
            T *__restrict run = rows + tap_offset[t];                                        \
            for (int ow = 0; ow < OW; ow++)                                                  \
                run[ow] += w * dy_row[ow];                                                   \
        }                                                                                    \
    }

CYCONV_DEPTHWISE_GRAD(float)
CYCONV_DEPTHWISE_GRAD(double)
CYCONV_DEPTHWISE_SCATTER(float)
CYCONV_DEPTHWISE_SCATTER(double)

#endif
