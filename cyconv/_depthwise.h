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
 * (fewer with the 32-byte vectors of CPUs without AVX-512: _multiversion.h)
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
#define DEPTHWISE_REST(T, W, n, TAP_BLOCK)                                                   \
    case n:                                                                                  \
        depthwise_grad_block_##T##W(dy, rows, tap_offset + t, length,                        \
                                    lanes + t * DIRECT_COLUMNS, sums + t, flush,             \
                                    n < TAP_BLOCK ? n : TAP_BLOCK);                          \
        break;
#define CYCONV_DEPTHWISE_GRAD_WIDTH(T, W, LANES, TAP_BLOCK)                                  \
    /* taps (a constant after inlining) taps' lane sums, each in DIRECT_COLUMNS / LANES      \
     * vectors; the last vectors' lanes past n are cleared by a select (not multiplied       \
     * by 0: the input there may be inf) */                                                  \
    static inline __attribute__((always_inline)) void depthwise_grad_block_##T##W(           \
        const T *dy, const T *rows, const ptrdiff_t *tap_offset, ptrdiff_t n, T *lanes,      \
        double *sums, int flush, const int taps)                                             \
    {                                                                                        \
        enum { PARTS = DIRECT_COLUMNS / LANES };                                             \
        mask_##T##W lane;                                                                    \
        for (int l = 0; l < LANES; l++)                                                      \
            lane[l] = l;                                                                     \
        vec_##T##W acc[TAP_BLOCK][PARTS];                                                    \
        const T *run[TAP_BLOCK];                                                             \
        for (int t = 0; t < taps; t++) {                                                     \
            for (int p = 0; p < PARTS; p++)                                                  \
                acc[t][p] = *(const vec_##T##W *)(lanes + t * DIRECT_COLUMNS + p * LANES);   \
            run[t] = rows + tap_offset[t];                                                   \
        }                                                                                    \
        ptrdiff_t i = 0;                                                                     \
        for (; i + DIRECT_COLUMNS <= n; i += DIRECT_COLUMNS)                                 \
            for (int p = 0; p < PARTS; p++) {                                                \
                vec_##T##W grad = *(const vec_##T##W *)(dy + i + p * LANES);                 \
                for (int t = 0; t < taps; t++)                                               \
                    acc[t][p] += grad * *(const vec_##T##W *)(run[t] + i + p * LANES);       \
            }                                                                                \
        for (int p = 0; p < PARTS && i < n; p++) {                                           \
            mask_##T##W keep = lane < (mask_##T##W){0} + (int)(n - i - p * LANES);           \
            const T *tail = dy + i + p * LANES;                                              \
            vec_##T##W grad = (vec_##T##W)((mask_##T##W) * (const vec_##T##W *)tail & keep); \
            for (int t = 0; t < taps; t++) {                                                 \
                const vec_##T##W *x = (const vec_##T##W *)(run[t] + i + p * LANES);          \
                acc[t][p] += grad * (vec_##T##W)((mask_##T##W) * x & keep);                  \
            }                                                                                \
        }                                                                                    \
        for (int t = 0; t < taps; t++) {                                                     \
            if (flush) {                                                                     \
                double total = 0;                                                            \
                for (int j = 0; j < DIRECT_COLUMNS; j++)                                     \
                    total += acc[t][j / LANES][j % LANES];                                   \
                sums[t] += total;                                                            \
                for (int p = 0; p < PARTS; p++)                                              \
                    acc[t][p] = (vec_##T##W){0};                                             \
            }                                                                                \
            for (int p = 0; p < PARTS; p++)                                                  \
                *(vec_##T##W *)(lanes + t * DIRECT_COLUMNS + p * LANES) = acc[t][p];         \
        }                                                                                    \
    }                                                                                        \
    /* TAP_BLOCK taps at a time, then the rest (fewer: a count of TAP_BLOCK or more does     \
     * not reach the switch) */                                                              \
    CYCONV_ALWAYS_INLINE void depthwise_grad_blocks_##T##W(                                  \
        const T *dy, const T *rows, const ptrdiff_t *tap_offset, int taps, ptrdiff_t length, \
        T *lanes, double *sums, int flush)                                                   \
    {                                                                                        \
        int t = 0;                                                                           \
        for (; t + TAP_BLOCK <= taps; t += TAP_BLOCK)                                        \
            depthwise_grad_block_##T##W(dy, rows, tap_offset + t, length,                    \
                                        lanes + t * DIRECT_COLUMNS, sums + t, flush,         \
                                        TAP_BLOCK);                                          \
        switch (taps - t) {                                                                  \
            DEPTHWISE_REST(T, W, 1, TAP_BLOCK) DEPTHWISE_REST(T, W, 2, TAP_BLOCK)            \
            DEPTHWISE_REST(T, W, 3, TAP_BLOCK) DEPTHWISE_REST(T, W, 4, TAP_BLOCK)            \
            DEPTHWISE_REST(T, W, 5, TAP_BLOCK) DEPTHWISE_REST(T, W, 6, TAP_BLOCK)            \
            DEPTHWISE_REST(T, W, 7, TAP_BLOCK) DEPTHWISE_REST(T, W, 8, TAP_BLOCK)            \
        }                                                                                    \
    }
/* Wide: the taps of a 3x3 window in one block of 64-byte (or wider) vectors;
 * narrow: 8 accumulators of 32 bytes, for AVX2's 16 registers (_multiversion.h). */
#define CYCONV_DEPTHWISE_GRAD(T)                                                             \
    CYCONV_DEPTHWISE_GRAD_WIDTH(T, , DIRECT_COLUMNS, DEPTHWISE_TAP_BLOCK)                    \
    CYCONV_DEPTHWISE_GRAD_WIDTH(T, _v32, (32 / (int)sizeof(T)),                              \
                                (8 * 32 / (int)sizeof(T) / DIRECT_COLUMNS))                  \
    CYCONV_MULTIVERSION_UNROLLED                                                             \
    static void depthwise_weight_grad_##T(const T *dy, const T *rows,                        \
                                          const ptrdiff_t *tap_offset, int taps,             \
                                          ptrdiff_t length, T *lanes, double *sums,          \
                                          int flush)                                         \
    {                                                                                        \
        if (cyconv_wide_vectors())                                                           \
            depthwise_grad_blocks_##T(dy, rows, tap_offset, taps, length, lanes, sums, flush); \
        else                                                                                 \
            depthwise_grad_blocks_##T##_v32(dy, rows, tap_offset, taps, length, lanes, sums, \
                                            flush);                                          \
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
    CYCONV_MULTIVERSION_UNROLLED                                                             \
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
