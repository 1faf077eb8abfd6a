/* Direct convolution of one output row, for layers with few taps.
 *
 * A layer whose K = C*kh*kw is small (the first layer of an RGB network:
 * K = 27) spends more of im2col + GEMM copying columns than multiplying.  Here
 * the caller prepares the input rows one output row reads (padding as zeros,
 * strided rows split into phases) so that tap k = (c, ki, kj) is one contiguous
 * run, rows + tap_offset[k], holding one input value per output column; then
 *
 *     out[oc * P + ow] = act(bias[oc] + sum_k weight[oc * K + k] * rows[tap_offset[k] + ow])
 *
 * for oc < OC, ow < OW, with act the activation of code act (_activate.h).
 * A block of output channels x DIRECT_VECTORS vectors of columns is accumulated
 * in registers at a time, so that each load of a run serves several channels
 * and each broadcast weight several vectors: vectors of DIRECT_COLUMNS columns
 * and blocks of DIRECT_CHANNELS channels with CPUs that have AVX-512 (24 of its
 * 32 registers), 32-byte vectors and DIRECT_CHANNELS_V32 channels with the
 * others (12 of 16).  When 2 vectors or more are left past the last whole block,
 * the row's last 3 vectors go as a whole block (columns done twice get the same
 * sums, so the same values), or as a block of 2 vectors in a row narrower than
 * 3; then one vector at a time; a run is read up to
 * DIRECT_COLUMNS - 1 elements past OW, so the caller pads each row by
 * DIRECT_COLUMNS.
 *
 * The kernel is compiled for baseline x86-64 and, where GCC can dispatch at
 * load time (target_clones), also for x86-64-v3 (AVX2 + FMA) and v4
 * (AVX-512): this is multiply-add work, and the default build's SSE2 has
 * neither wide vectors nor fused multiply-add.
 */
#ifndef CYCONV_DIRECT_CONV_H
#define CYCONV_DIRECT_CONV_H
#include <stddef.h>
#include <string.h>

#define DIRECT_CHANNELS 8
#define DIRECT_CHANNELS_V32 4
#define DIRECT_VECTORS 3
#define DIRECT_COLUMNS 16
#define DIRECT_MAX_TAPS 288

#include "_multiversion.h"
#include "_activate.h"

#if defined(__GNUC__)
#define DIRECT_VECTORIZED 1
/* GCC and clang: one vector of LANES columns per accumulator, named by width W
 * (generic vector extensions: the compiler maps it onto xmm, ymm or zmm
 * registers for each clone).  Plain loops over a local array were not kept in
 * registers. */
#define CYCONV_DIRECT_CONV(T, MASK, W, LANES)                                                \
    typedef T vec_##T##W __attribute__((vector_size(LANES * sizeof(T)),                      \
                                        aligned(sizeof(T))));                                \
    typedef MASK mask_##T##W __attribute__((vector_size(LANES * sizeof(T))));                \
    CYCONV_VECTOR_ACTIVATE(direct_activate_##T##W, vec_##T##W, mask_##T##W)                  \
    static inline __attribute__((always_inline)) void direct_store_##T##W(                   \
        T *out, vec_##T##W *value, int columns, int act)                                     \
    {                                                                                        \
        *value = direct_activate_##T##W(*value, act);                                        \
        if (columns == LANES)                                                                \
            *(vec_##T##W *)out = *value;                                                     \
        else                                                                                 \
            memcpy(out, value, columns * sizeof(T));                                         \
    }                                                                                        \
    /* channels x vectors (constants after inlining) accumulators: output channels from      \
     * oc, columns from ow0 in vectors of LANES (the last one partial only when vectors      \
     * is 1); each tap's runs are loaded once for all the block's channels */                \
    static inline __attribute__((always_inline)) void direct_block_##T##W(                   \
        const T *weight, const T *bias, const T *rows, const ptrdiff_t *tap_offset, int K,   \
        int OW, int act, T *out, ptrdiff_t P, int oc, int ow0, const int channels,           \
        const int vectors)                                                                   \
    {                                                                                        \
        vec_##T##W acc[DIRECT_CHANNELS][DIRECT_VECTORS];                                     \
        for (int j = 0; j < channels; j++)                                                   \
            for (int v = 0; v < vectors; v++)                                                \
                acc[j][v] = (bias ? bias[oc + j] : 0) + (vec_##T##W){0};                     \
        for (int k = 0; k < K; k++) {                                                        \
            vec_##T##W run[DIRECT_VECTORS];                                                  \
            for (int v = 0; v < vectors; v++)                                                \
                run[v] = *(const vec_##T##W *)(rows + tap_offset[k] + ow0 + v * LANES);      \
            for (int j = 0; j < channels; j++) {                                             \
                T w = weight[(ptrdiff_t)(oc + j) * K + k];                                   \
                for (int v = 0; v < vectors; v++)                                            \
                    acc[j][v] += w * run[v];                                                 \
            }                                                                                \
        }                                                                                    \
        for (int j = 0; j < channels; j++)                                                   \
            for (int v = 0; v < vectors; v++) {                                              \
                int columns = OW - ow0 - v * LANES;                                          \
                direct_store_##T##W(out + (oc + j) * P + ow0 + v * LANES, &acc[j][v],        \
                                    columns < LANES ? columns : LANES, act);                 \
            }                                                                                \
    }
#else
#define DIRECT_VECTORIZED 0
/* Other compilers: the same blocks as plain loops (slower than im2col + GEMM:
 * nn/conv.py then uses the direct kernel only when a test asks for it). */
#define CYCONV_DIRECT_CONV(T, MASK, W, LANES)                                                \
    static void direct_block_##T##W(const T *weight, const T *bias, const T *rows,           \
                                    const ptrdiff_t *tap_offset, int K, int OW, int act,     \
                                    T *out, ptrdiff_t P, int oc, int ow0,                    \
                                    const int channels, const int vectors)                   \
    {                                                                                        \
        int columns = OW - ow0 < vectors * LANES ? OW - ow0 : vectors * LANES;               \
        for (int j = 0; j < channels; j++)                                                   \
            for (int i = 0; i < columns; i++) {                                              \
                T acc = bias ? bias[oc + j] : 0;                                             \
                for (int k = 0; k < K; k++)                                                  \
                    acc += weight[(ptrdiff_t)(oc + j) * K + k] *                             \
                           rows[tap_offset[k] + ow0 + i];                                    \
                out[(oc + j) * P + ow0 + i] = CYCONV_ACTIVATE(acc, act);                     \
            }                                                                                \
    }
#endif

/* out rows of all OC channels for one output row (see the top of this file): blocks of
 * CHANNELS channels x DIRECT_VECTORS vectors of LANES columns, then one of 2 vectors if
 * so many columns are left, then DIRECT_CHANNELS channels x 1 vector at a time; act is
 * made a constant in each of three copies of the loop, so that no store tests it */
#define CYCONV_DIRECT_ROW(T, W, LANES, CHANNELS)                                             \
    /* columns from ow0 (vectors of LANES) of all OC channels: blocks of channels, then      \
     * one channel at a time */                                                              \
    CYCONV_ALWAYS_INLINE void direct_columns_##T##W(                                         \
        const T *weight, const T *bias, const T *rows, const ptrdiff_t *tap_offset, int OC,  \
        int K, int OW, int act, T *out, ptrdiff_t P, int ow0, const int channels,            \
        const int vectors)                                                                   \
    {                                                                                        \
        int oc = 0;                                                                          \
        for (; oc + channels <= OC; oc += channels)                                          \
            direct_block_##T##W(weight, bias, rows, tap_offset, K, OW, act, out, P, oc, ow0, \
                                channels, vectors);                                          \
        for (; oc < OC; oc++)                                                                \
            direct_block_##T##W(weight, bias, rows, tap_offset, K, OW, act, out, P, oc, ow0, \
                                1, vectors);                                                 \
    }                                                                                        \
    CYCONV_ALWAYS_INLINE void direct_row_act_##T##W(                                         \
        const T *weight, const T *bias, const T *rows, const ptrdiff_t *tap_offset, int OC,  \
        int K, int OW, int act, T *out, ptrdiff_t P)                                         \
    {                                                                                        \
        int ow0 = 0;                                                                         \
        for (; ow0 + DIRECT_VECTORS * LANES <= OW; ow0 += DIRECT_VECTORS * LANES)            \
            direct_columns_##T##W(weight, bias, rows, tap_offset, OC, K, OW, act, out, P,    \
                                  ow0, CHANNELS, DIRECT_VECTORS);                            \
        if (ow0 + 2 * LANES <= OW && OW >= DIRECT_VECTORS * LANES) {                         \
            /* the last columns as a whole block, some of them again (the same sums:         \
             * the same values); GCC spilled the accumulators of a 2-vector block */         \
            direct_columns_##T##W(weight, bias, rows, tap_offset, OC, K, OW, act, out, P,    \
                                  OW - DIRECT_VECTORS * LANES, CHANNELS, DIRECT_VECTORS);    \
            ow0 = OW;                                                                        \
        } else if (ow0 + 2 * LANES <= OW) {                                                  \
            direct_columns_##T##W(weight, bias, rows, tap_offset, OC, K, OW, act, out, P,    \
                                  ow0, CHANNELS, 2);                                         \
            ow0 += 2 * LANES;                                                                \
        }                                                                                    \
        for (; ow0 < OW; ow0 += LANES)                                                       \
            direct_columns_##T##W(weight, bias, rows, tap_offset, OC, K, OW, act, out, P,    \
                                  ow0, DIRECT_CHANNELS, 1);                                  \
    }                                                                                        \
    CYCONV_ALWAYS_INLINE void direct_row_##T##W(                                             \
        const T *weight, const T *bias, const T *rows, const ptrdiff_t *tap_offset, int OC,  \
        int K, int OW, int act, T *out, ptrdiff_t P)                                         \
    {                                                                                        \
        if (act == 0)                                                                        \
            direct_row_act_##T##W(weight, bias, rows, tap_offset, OC, K, OW, 0, out, P);     \
        else if (act == 1)                                                                   \
            direct_row_act_##T##W(weight, bias, rows, tap_offset, OC, K, OW, 1, out, P);     \
        else                                                                                 \
            direct_row_act_##T##W(weight, bias, rows, tap_offset, OC, K, OW, 2, out, P);     \
    }

/* the row in the CPU's vector width (_multiversion.h) */
#define CYCONV_DIRECT_KERNEL(T)                                                              \
    CYCONV_MULTIVERSION_UNROLLED                                                             \
    static void conv_row_direct_##T(const T *weight, const T *bias, const T *rows,           \
                                    const ptrdiff_t *tap_offset, int OC, int K, int OW,      \
                                    int act, T *out, ptrdiff_t P)                            \
    {                                                                                        \
        if (cyconv_wide_vectors())                                                           \
            direct_row_##T(weight, bias, rows, tap_offset, OC, K, OW, act, out, P);          \
        else                                                                                 \
            direct_row_##T##_v32(weight, bias, rows, tap_offset, OC, K, OW, act, out, P);    \
    }

/* Wide: DIRECT_COLUMNS columns (64 bytes of float, 128 of double), under the plain
 * names (vec_float, ...: _depthwise.h's kernels use these vectors too); narrow:
 * 32 bytes, names ending in _v32. */
CYCONV_DIRECT_CONV(float, int, , DIRECT_COLUMNS)
CYCONV_DIRECT_CONV(double, long long, , DIRECT_COLUMNS)
CYCONV_DIRECT_CONV(float, int, _v32, 8)
CYCONV_DIRECT_CONV(double, long long, _v32, 4)
CYCONV_DIRECT_ROW(float, , DIRECT_COLUMNS, DIRECT_CHANNELS)
CYCONV_DIRECT_ROW(double, , DIRECT_COLUMNS, DIRECT_CHANNELS)
CYCONV_DIRECT_ROW(float, _v32, 8, DIRECT_CHANNELS_V32)
CYCONV_DIRECT_ROW(double, _v32, 4, DIRECT_CHANNELS_V32)
CYCONV_DIRECT_KERNEL(float)
CYCONV_DIRECT_KERNEL(double)

#include "_typed.h"
#define conv_row_direct(weight, ...) CYCONV_TYPED(conv_row_direct, weight, __VA_ARGS__)

#endif
