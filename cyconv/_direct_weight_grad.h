/* Weight gradient of a layer with few taps, a band of output rows at a time: the
 * direct kernel's backward (_direct_conv.h is its forward).
 *
 * A network's first layer (K = C*kh*kw = 27 for RGB 3x3) has a weight gradient
 * of few entries (OC x K) summed over many pixels: as im2col + GEMM it is a
 * product of a tiny output with a long inner dimension, which BLAS runs slowly,
 * after copying K columns per pixel.  Here, from the rows that
 * _conv_direct.prepare_band lays out for the forward (tap k = (c, ki, kj) is
 * the run rows + tap_offset[k], one input value per output column),
 *
 *     lanes[(oc*K + k)*L + l] += sum_{r, v} dy[(oc*count + r)*ldy + v*L + l]
 *                                           * run_k[r*rows_stride + v*L + l]
 *
 * for r < count rows, v < vectors, l < L: each of the L lanes of an (oc, k) pair
 * keeps a partial sum over the output columns l, l + L, l + 2L ... of every row,
 * which the caller adds up in order.  dy holds the band's output gradient, row r
 * of channel oc at (oc*count + r)*ldy, zero from OW up to vectors*L; the rows of
 * output row r start at r*rows_stride; the last vector of each run is cut to its
 * valid lanes (the run goes on into pixels no output of this row reads: they
 * must not reach the sum, not even as 0 * inf).
 *
 * Blocks of 4 channels x 3 taps stay in registers over the whole band: 12
 * accumulators, 7 vectors loaded per 12 multiply-adds.  The vectors are 32 bytes
 * in every clone (_multiversion.h), so CPUs with AVX2 and with AVX-512 add in
 * the same order and give the same bits.
 */
#ifndef CYCONV_DIRECT_WEIGHT_GRAD_H
#define CYCONV_DIRECT_WEIGHT_GRAD_H
#include <stddef.h>

#include "_multiversion.h"

#define WEIGHT_GRAD_VECTOR_BYTES 32
#define WEIGHT_GRAD_CHANNELS 4
#define WEIGHT_GRAD_TAPS 3

#if defined(__GNUC__)
#define CYCONV_WEIGHT_GRAD_ROW(T, MASK)                                                       \
    typedef T wg_vec_##T __attribute__((vector_size(WEIGHT_GRAD_VECTOR_BYTES),                \
                                        aligned(sizeof(T))));                                 \
    typedef MASK wg_mask_##T __attribute__((vector_size(WEIGHT_GRAD_VECTOR_BYTES)));          \
    /* channels x taps (constants after inlining) pairs from (oc, k) over one row */          \
    CYCONV_ALWAYS_INLINE void wg_block_##T(const T *dy, ptrdiff_t ldy, int count,             \
                                           const T *rows, ptrdiff_t rows_stride,              \
                                           const ptrdiff_t *tap_offset, int K, int vectors,   \
                                           wg_mask_##T tail, T *lanes, int oc, int k,         \
                                           const int channels, const int taps)                \
    {                                                                                         \
        enum { L = WEIGHT_GRAD_VECTOR_BYTES / sizeof(T) };                                    \
        wg_vec_##T acc[WEIGHT_GRAD_CHANNELS][WEIGHT_GRAD_TAPS], run[WEIGHT_GRAD_TAPS];        \
        for (int j = 0; j < channels; j++)                                                    \
            for (int t = 0; t < taps; t++)                                                    \
                acc[j][t] = *(wg_vec_##T *)(lanes + ((ptrdiff_t)(oc + j) * K + k + t) * L);   \
        for (int r = 0; r < count; r++)                                                       \
            for (int v = 0; v < vectors; v++) {                                               \
                for (int t = 0; t < taps; t++) {                                              \
                    run[t] = *(const wg_vec_##T *)(rows + r * rows_stride + tap_offset[k + t] \
                                                   + v * L);                                  \
                    if (v == vectors - 1)                                                     \
                        run[t] = (wg_vec_##T)((wg_mask_##T)run[t] & tail);                    \
                }                                                                             \
                for (int j = 0; j < channels; j++) {                                          \
                    wg_vec_##T d = *(const wg_vec_##T *)(dy + ((ptrdiff_t)(oc + j) * count    \
                                                               + r) * ldy + v * L);           \
                    for (int t = 0; t < taps; t++)                                            \
                        acc[j][t] += d * run[t];                                              \
                }                                                                             \
            }                                                                                 \
        for (int j = 0; j < channels; j++)                                                    \
            for (int t = 0; t < taps; t++)                                                    \
                *(wg_vec_##T *)(lanes + ((ptrdiff_t)(oc + j) * K + k + t) * L) = acc[j][t];   \
    }                                                                                         \
    CYCONV_ALWAYS_INLINE void wg_channels_##T(const T *dy, ptrdiff_t ldy, int count,          \
                                              const T *rows, ptrdiff_t rows_stride,           \
                                              const ptrdiff_t *tap_offset, int K,             \
                                              int vectors, wg_mask_##T tail, T *lanes,        \
                                              int oc, const int channels)                     \
    {                                                                                         \
        int k = 0;                                                                            \
        for (; k + WEIGHT_GRAD_TAPS <= K; k += WEIGHT_GRAD_TAPS)                              \
            wg_block_##T(dy, ldy, count, rows, rows_stride, tap_offset, K, vectors, tail,     \
                         lanes, oc, k, channels, WEIGHT_GRAD_TAPS);                           \
        for (; k < K; k++)                                                                    \
            wg_block_##T(dy, ldy, count, rows, rows_stride, tap_offset, K, vectors, tail,     \
                         lanes, oc, k, channels, 1);                                          \
    }                                                                                         \
    /* the products of count output rows (see the top of this file); OW > 0 columns */        \
    CYCONV_MULTIVERSION_UNROLLED static void conv_rows_weight_grad_##T(                       \
        const T *dy, ptrdiff_t ldy, int count, const T *rows, ptrdiff_t rows_stride,          \
        const ptrdiff_t *tap_offset, int OC, int K, int OW, T *lanes)                         \
    {                                                                                         \
        enum { L = WEIGHT_GRAD_VECTOR_BYTES / sizeof(T) };                                    \
        int vectors = (OW + L - 1) / L, oc = 0;                                               \
        wg_mask_##T tail;                                                                     \
        for (int l = 0; l < L; l++)                                                           \
            tail[l] = l < OW - (vectors - 1) * L ? -1 : 0;                                    \
        for (; oc + WEIGHT_GRAD_CHANNELS <= OC; oc += WEIGHT_GRAD_CHANNELS)                   \
            wg_channels_##T(dy, ldy, count, rows, rows_stride, tap_offset, K, vectors, tail,  \
                            lanes, oc, WEIGHT_GRAD_CHANNELS);                                 \
        for (; oc < OC; oc++)                                                                 \
            wg_channels_##T(dy, ldy, count, rows, rows_stride, tap_offset, K, vectors, tail,  \
                            lanes, oc, 1);                                                    \
    }
#else
/* Other compilers: the same sums as plain loops, lane by lane. */
#define CYCONV_WEIGHT_GRAD_ROW(T, MASK)                                                       \
    static void conv_rows_weight_grad_##T(const T *dy, ptrdiff_t ldy, int count,              \
                                          const T *rows, ptrdiff_t rows_stride,               \
                                          const ptrdiff_t *tap_offset, int OC, int K, int OW, \
                                          T *lanes)                                           \
    {                                                                                         \
        const int L = WEIGHT_GRAD_VECTOR_BYTES / sizeof(T);                                   \
        for (int oc = 0; oc < OC; oc++)                                                       \
            for (int k = 0; k < K; k++)                                                       \
                for (int r = 0; r < count; r++)                                               \
                    for (int i = 0; i < OW; i++)                                              \
                        lanes[((ptrdiff_t)oc * K + k) * L + i % L] +=                         \
                            dy[((ptrdiff_t)oc * count + r) * ldy + i] *                       \
                            rows[r * rows_stride + tap_offset[k] + i];                        \
    }
#endif

CYCONV_WEIGHT_GRAD_ROW(float, int)
CYCONV_WEIGHT_GRAD_ROW(double, long long)

#include "_typed.h"
#define conv_rows_weight_grad(dy, ...) CYCONV_TYPED(conv_rows_weight_grad, dy, __VA_ARGS__)

#endif
