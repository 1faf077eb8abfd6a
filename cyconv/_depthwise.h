/* Depthwise convolution, the gradients of one plane (see _depthwise.pyx for the layout).
 *
 * rows is one input plane prepared so that tap t of every output pixel i (the
 * output plane flattened with a row pitch of L >= OW) is the contiguous run
 * rows + tap_offset[t], i < n = OH * L.  dy is the output gradient in the same
 * pitch, 0 in the columns past OW.  Both may be read DIRECT_COLUMNS - 1 elements past
 * the run (vector loads).  Then
 *
 *   depthwise_weight_grad: sums[t] += sum_{i < n} dy[i] * run_t[i]
 *   depthwise_scatter:     run_t[i] += weight[t] * dy[i], every tap t, i < n
 *
 * The weight gradient keeps DEPTHWISE_TAP_BLOCK taps' sums in vector registers
 * while it streams through the plane once per block.  Between calls they wait
 * in lanes (taps, DIRECT_COLUMNS), zeroed by the caller at first; a call with
 * flush adds each tap's lanes in order, in double precision, to sums[t] and
 * zeroes them.  (Adding up 16 lanes in double for every small plane cost more
 * than the plane itself.)  A fixed order of additions throughout.
 */
#ifndef CYCONV_DEPTHWISE_H
#define CYCONV_DEPTHWISE_H
#include "_direct_conv.h"

#define DEPTHWISE_TAP_BLOCK 9

#if DIRECT_VECTORIZED
#define DEPTHWISE_REST(T, n)                                                                 \
    case n:                                                                                  \
        depthwise_grad_block_##T(dy, rows, tap_offset + t, length, lanes + t * DIRECT_COLUMNS, \
                                 sums + t, flush, n);                                        \
        break;
#define CYCONV_DEPTHWISE_GRAD(T)                                                             \
    /* taps (a constant after inlining) taps' lane sums; the last vector's lanes past n are \
     * cleared by a select (not multiplied by 0: the input there may be inf) */             \
    static inline __attribute__((always_inline)) void depthwise_grad_block_##T(              \
        const T *dy, const T *rows, const ptrdiff_t *tap_offset, ptrdiff_t n, T *lanes,      \
        double *sums, int flush, const int taps)                                             \
    {                                                                                        \
        const mask_##T lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};        \
        vec_##T acc[DEPTHWISE_TAP_BLOCK];                                                    \
        const T *run[DEPTHWISE_TAP_BLOCK];                                                   \
        for (int t = 0; t < taps; t++) {                                                     \
            acc[t] = *(const vec_##T *)(lanes + t * DIRECT_COLUMNS);                         \
            run[t] = rows + tap_offset[t];                                                   \
        }                                                                                    \
        ptrdiff_t i = 0;                                                                     \
        for (; i + DIRECT_COLUMNS <= n; i += DIRECT_COLUMNS) {                               \
            vec_##T grad = *(const vec_##T *)(dy + i);                                       \
            for (int t = 0; t < taps; t++)                                                   \
                acc[t] += grad * *(const vec_##T *)(run[t] + i);                             \
        }                                                                                    \
        if (i < n) {                                                                         \
            mask_##T keep = lane < (mask_##T){0} + (int)(n - i);                             \
            vec_##T grad = (vec_##T)((mask_##T) * (const vec_##T *)(dy + i) & keep);         \
            for (int t = 0; t < taps; t++)                                                   \
                acc[t] += grad * (vec_##T)((mask_##T) * (const vec_##T *)(run[t] + i) & keep); \
        }                                                                                    \
        for (int t = 0; t < taps; t++) {                                                     \
            if (flush) {                                                                     \
                double total = 0;                                                            \
                for (int j = 0; j < DIRECT_COLUMNS; j++)                                     \
                    total += acc[t][j];                                                      \
                sums[t] += total;                                                            \
                acc[t] = (vec_##T){0};                                                       \
            }                                                                                \
            *(vec_##T *)(lanes + t * DIRECT_COLUMNS) = acc[t];                               \
        }                                                                                    \
    }                                                                                        \
    CYCONV_MULTIVERSION                                                                      \
    static void depthwise_weight_grad_##T(const T *dy, const T *rows,                        \
                                          const ptrdiff_t *tap_offset, int taps,             \
                                          ptrdiff_t length, T *lanes, double *sums,          \
                                          int flush)                                         \
    {                                                                                        \
        int t = 0;                                                                           \
        for (; t + DEPTHWISE_TAP_BLOCK <= taps; t += DEPTHWISE_TAP_BLOCK)                    \
            depthwise_grad_block_##T(dy, rows, tap_offset + t, length,                       \
                                     lanes + t * DIRECT_COLUMNS, sums + t, flush,            \
                                     DEPTHWISE_TAP_BLOCK);                                   \
        switch (taps - t) { /* the rest, its count a constant in each case */                \
            DEPTHWISE_REST(T, 1) DEPTHWISE_REST(T, 2) DEPTHWISE_REST(T, 3)                   \
            DEPTHWISE_REST(T, 4) DEPTHWISE_REST(T, 5) DEPTHWISE_REST(T, 6)                   \
            DEPTHWISE_REST(T, 7) DEPTHWISE_REST(T, 8)                                        \
        }                                                                                    \
    }
#else
/* Other compilers: plain loops, one tap at a time, straight into the sums. */
#define CYCONV_DEPTHWISE_GRAD(T)                                                             \
    static void depthwise_weight_grad_##T(const T *dy, const T *rows,                        \
                                          const ptrdiff_t *tap_offset, int taps,             \
                                          ptrdiff_t length, T *lanes, double *sums,          \
                                          int flush)                                         \
    {                                                                                        \
        for (int t = 0; t < taps; t++) {                                                     \
            double total = 0;                                                                \
            for (ptrdiff_t i = 0; i < length; i++)                                           \
                total += dy[i] * rows[tap_offset[t] + i];                                    \
            sums[t] += total;                                                                \
        }                                                                                    \
    }
#endif

#define CYCONV_DEPTHWISE_SCATTER(T)                                                          \
    CYCONV_MULTIVERSION                                                                      \
    static void depthwise_scatter_##T(T *__restrict rows, const ptrdiff_t *tap_offset,       \
                                      const T *weight, int taps, const T *__restrict dy,     \
                                      ptrdiff_t length)                                      \
    {                                                                                        \
        for (int t = 0; t < taps; t++) {                                                     \
            T w = weight[t];                                                                 \
            T *__restrict run = rows + tap_offset[t];                                        \
            for (ptrdiff_t i = 0; i < length; i++)                                           \
                run[i] += w * dy[i];                                                         \
        }                                                                                    \
    }

/* dst[r * dst_pitch + k * dst_step] = src[r * src_pitch + k * src_step] (where mask is NULL
 * or mask[r * src_pitch + k * src_step] > 0, else 0), r < rows, k < width: rows moved
 * between layouts, one call per plane (the rows are short: a call each cost more than
 * the copy).  Unit steps, the common case, vectorise. */
#if DIRECT_VECTORIZED
/* Rows of a few elements (a 7x7 plane's) are copied with whole vectors, the last one
 * overlapping the one before (DIRECT_COLUMNS, or 4, elements at a time): a loop of
 * scalar moves per short row cost more than the rest of the plane's work. */
#define CYCONV_COPY_ROW(T)                                                                   \
    typedef T quad_##T __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T))));     \
    typedef MASK_OF_##T quad_mask_##T __attribute__((vector_size(4 * sizeof(T))));           \
    /* d[k] = s[k] (where m[k] > 0, else 0, unless m is NULL), k < w */                     \
    static inline __attribute__((always_inline)) void copy_row_##T(                          \
        T *d, const T *s, const T *m, ptrdiff_t w)                                           \
    {                                                                                        \
        if (w >= DIRECT_COLUMNS) {                                                           \
            for (ptrdiff_t k = 0; k < w; k += DIRECT_COLUMNS) {                              \
                ptrdiff_t at = k + DIRECT_COLUMNS <= w ? k : w - DIRECT_COLUMNS;             \
                vec_##T v = *(const vec_##T *)(s + at);                                      \
                if (m)                                                                       \
                    v = (vec_##T)((mask_##T)v & (*(const vec_##T *)(m + at) > 0));           \
                *(vec_##T *)(d + at) = v;                                                    \
            }                                                                                \
        } else if (w >= 4) {                                                                 \
            for (ptrdiff_t k = 0; k < w; k += 4) {                                           \
                ptrdiff_t at = k + 4 <= w ? k : w - 4;                                       \
                quad_##T v = *(const quad_##T *)(s + at);                                    \
                if (m)                                                                       \
                    v = (quad_##T)((quad_mask_##T)v & (*(const quad_##T *)(m + at) > 0));    \
                *(quad_##T *)(d + at) = v;                                                   \
            }                                                                                \
        } else {                                                                             \
            for (ptrdiff_t k = 0; k < w; k++)                                                \
                d[k] = m && !(m[k] > 0) ? (T)0 : s[k];                                       \
        }                                                                                    \
    }
#define MASK_OF_float int
#define MASK_OF_double long long
#if defined(__clang__) || __GNUC__ >= 12
/* d[k] = s[2k], k < w, for 5 <= w < DIRECT_COLUMNS (a stride-2 row of a small plane):
 * 8 elements loaded, every other one kept, never reading past s[2w - 2]. */
#define CYCONV_GATHER_ROW2(T)                                                                \
    typedef T oct_##T __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T))));      \
    static inline __attribute__((always_inline)) int gather_row2_##T(T *d, const T *s,       \
                                                                    ptrdiff_t w)             \
    {                                                                                        \
        if (w < 5 || w >= DIRECT_COLUMNS)                                                    \
            return 0;                                                                        \
        for (ptrdiff_t k = 0; k + 5 <= w; k += 4) {                                          \
            oct_##T v = *(const oct_##T *)(s + 2 * k);                                       \
            *(quad_##T *)(d + k) = (quad_##T)__builtin_shufflevector(v, v, 0, 2, 4, 6);      \
        }                                                                                    \
        oct_##T v = *(const oct_##T *)(s + 2 * w - 9);                                       \
        *(quad_##T *)(d + w - 4) = (quad_##T)__builtin_shufflevector(v, v, 1, 3, 5, 7);      \
        return 1;                                                                            \
    }
#else
#define CYCONV_GATHER_ROW2(T)                                                                \
    static inline int gather_row2_##T(T *d, const T *s, ptrdiff_t w) { return 0; }
#endif
#else
#define CYCONV_COPY_ROW(T)                                                                   \
    static inline void copy_row_##T(T *d, const T *s, const T *m, ptrdiff_t w)              \
    {                                                                                        \
        for (ptrdiff_t k = 0; k < w; k++)                                                    \
            d[k] = m && !(m[k] > 0) ? (T)0 : s[k];                                           \
    }
#define CYCONV_GATHER_ROW2(T)                                                                \
    static inline int gather_row2_##T(T *d, const T *s, ptrdiff_t w) { return 0; }
#endif

/* dst[r * dst_pitch + k * dst_step] = src[r * src_pitch + k * src_step] (where mask is NULL
 * or mask[r * src_pitch + k] > 0, else 0; with a mask both steps are 1), r < rows,
 * k < width: rows moved between layouts, one call per plane. */
#define CYCONV_COPY_RUNS(T)                                                                  \
    CYCONV_MULTIVERSION                                                                      \
    static void copy_runs_##T(T *__restrict dst, ptrdiff_t dst_pitch, ptrdiff_t dst_step,    \
                              const T *__restrict src, ptrdiff_t src_pitch,                  \
                              ptrdiff_t src_step, const T *__restrict mask, ptrdiff_t rows,  \
                              ptrdiff_t width)                                               \
    {                                                                                        \
        for (ptrdiff_t r = 0; r < rows; r++) {                                               \
            T *__restrict d = dst + r * dst_pitch;                                           \
            const T *__restrict s = src + r * src_pitch;                                     \
            if (dst_step == 1 && src_step == 1) {                                            \
                copy_row_##T(d, s, mask ? mask + r * src_pitch : NULL, width);               \
            } else if (dst_step == 1 && src_step == 2) {                                     \
                if (!gather_row2_##T(d, s, width))                                           \
                    for (ptrdiff_t k = 0; k < width; k++)                                    \
                        d[k] = s[2 * k];                                                     \
            } else if (dst_step == 2 && src_step == 1) {                                     \
                for (ptrdiff_t k = 0; k < width; k++)                                        \
                    d[2 * k] = s[k];                                                         \
            } else {                                                                         \
                for (ptrdiff_t k = 0; k < width; k++)                                        \
                    d[k * dst_step] = s[k * src_step];                                       \
            }                                                                                \
        }                                                                                    \
    }

/* out[i] = act(bias + sum_t weight[t] * rows[tap_offset[t] + i]) for i < n, act the
 * activation of code act (CYCONV_ACTIVATE): one output channel from one input plane (the direct
 * kernel's rows, with blocks of DEPTHWISE_RUN_VECTORS vectors in flight instead of
 * channels), in the CPU's vector width (vec_T or vec_T_v32: _direct_conv.h).  Whole
 * vectors are stored: out has room for DIRECT_COLUMNS - 1 more. */
#if DIRECT_VECTORIZED
#define DEPTHWISE_RUN_VECTORS 4
#define CYCONV_DEPTHWISE_RUN_WIDTH(T, W, LANES)                                              \
    static inline __attribute__((always_inline)) void depthwise_run_block_##T##W(            \
        const T *weight, T bias, const T *rows, const ptrdiff_t *tap_offset, int taps,       \
        int act, T *out, const int vectors)                                                  \
    {                                                                                        \
        vec_##T##W acc[DEPTHWISE_RUN_VECTORS];                                               \
        for (int v = 0; v < vectors; v++)                                                    \
            acc[v] = bias + (vec_##T##W){0};                                                 \
        for (int t = 0; t < taps; t++) {                                                     \
            const T *run = rows + tap_offset[t];                                             \
            for (int v = 0; v < vectors; v++)                                                \
                acc[v] += weight[t] * *(const vec_##T##W *)(run + v * LANES);                \
        }                                                                                    \
        for (int v = 0; v < vectors; v++)                                                    \
            *(vec_##T##W *)(out + v * LANES) = direct_activate_##T##W(acc[v], act);          \
    }                                                                                        \
    CYCONV_ALWAYS_INLINE void depthwise_run_vectors_##T##W(                                  \
        const T *weight, T b, const T *rows, const ptrdiff_t *tap_offset, int taps,          \
        ptrdiff_t n, int act, T *out)                                                        \
    {                                                                                        \
        const ptrdiff_t block = DEPTHWISE_RUN_VECTORS * LANES;                               \
        ptrdiff_t i = 0;                                                                     \
        for (; i + block < n; i += block)                                                    \
            depthwise_run_block_##T##W(weight, b, rows + i, tap_offset, taps, act, out + i,  \
                                       DEPTHWISE_RUN_VECTORS);                               \
        switch ((n - i + LANES - 1) / LANES) { /* the rest, as constants */                  \
        case 4: depthwise_run_block_##T##W(weight, b, rows + i, tap_offset, taps, act, out + i, 4); \
                break;                                                                       \
        case 3: depthwise_run_block_##T##W(weight, b, rows + i, tap_offset, taps, act, out + i, 3); \
                break;                                                                       \
        case 2: depthwise_run_block_##T##W(weight, b, rows + i, tap_offset, taps, act, out + i, 2); \
                break;                                                                       \
        case 1: depthwise_run_block_##T##W(weight, b, rows + i, tap_offset, taps, act, out + i, 1); \
                break;                                                                       \
        }                                                                                    \
    }
#define CYCONV_DEPTHWISE_RUN(T)                                                              \
    CYCONV_DEPTHWISE_RUN_WIDTH(T, , DIRECT_COLUMNS)                                          \
    CYCONV_DEPTHWISE_RUN_WIDTH(T, _v32, (32 / (int)sizeof(T)))                              \
    CYCONV_MULTIVERSION                                                                      \
    static void depthwise_run_##T(const T *weight, const T *bias, const T *rows,             \
                                  const ptrdiff_t *tap_offset, int taps, ptrdiff_t n,        \
                                  int act, T *out)                                           \
    {                                                                                        \
        T b = bias ? *bias : 0;                                                              \
        if (cyconv_wide_vectors())                                                           \
            depthwise_run_vectors_##T(weight, b, rows, tap_offset, taps, n, act, out);       \
        else                                                                                 \
            depthwise_run_vectors_##T##_v32(weight, b, rows, tap_offset, taps, n, act, out); \
    }
#else
#define CYCONV_DEPTHWISE_RUN(T)                                                              \
    static void depthwise_run_##T(const T *weight, const T *bias, const T *rows,             \
                                  const ptrdiff_t *tap_offset, int taps, ptrdiff_t n,        \
                                  int act, T *out)                                           \
    {                                                                                        \
        for (ptrdiff_t i = 0; i < n; i++) {                                                  \
            T acc = bias ? *bias : 0;                                                        \
            for (int t = 0; t < taps; t++)                                                   \
                acc += weight[t] * rows[tap_offset[t] + i];                                  \
            out[i] = CYCONV_ACTIVATE(acc, act);                                              \
        }                                                                                    \
    }
#endif

CYCONV_COPY_ROW(float)
CYCONV_COPY_ROW(double)
CYCONV_GATHER_ROW2(float)
CYCONV_GATHER_ROW2(double)
CYCONV_COPY_RUNS(float)
CYCONV_COPY_RUNS(double)
CYCONV_DEPTHWISE_RUN(float)
CYCONV_DEPTHWISE_RUN(double)
CYCONV_DEPTHWISE_GRAD(float)
CYCONV_DEPTHWISE_GRAD(double)
CYCONV_DEPTHWISE_SCATTER(float)
CYCONV_DEPTHWISE_SCATTER(double)

#include "_typed.h"
#define copy_runs(dst, ...) CYCONV_TYPED(copy_runs, dst, __VA_ARGS__)
#define depthwise_run(weight, ...) CYCONV_TYPED(depthwise_run, weight, __VA_ARGS__)
#define depthwise_weight_grad(dy, ...) CYCONV_TYPED(depthwise_weight_grad, dy, __VA_ARGS__)
#define depthwise_scatter(rows, ...) CYCONV_TYPED(depthwise_scatter, rows, __VA_ARGS__)

#endif
