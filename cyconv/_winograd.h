/* Winograd F(4x4, 3x3): the C kernels of _winograd.pyx (3x3, stride 1 convolutions).
 *
 * A 4x4 block of outputs ("tile") of a 3x3 convolution is
 *     y = A^T [ (G g G^T) (.) (B^T d B) ] A
 * for the 3x3 filter g and the 6x6 input patch d the tile reads, (.) the
 * elementwise product: 36 products per input channel where direct convolution
 * needs 144 (Lavin and Gray 2016; the matrices are in _winograd_kernels.h).
 * Summed over input channels, each of the 36 transformed positions
 * xi = 6*a + b is a matrix product (output channels x input channels) times
 * (input channels x tiles).  The filter transforms are computed in double; in
 * float64 the results stay within the tests' tolerances of direct convolution,
 * in float32 within PyTorch's.
 *
 * Transformed data is stored position-major: element (xi, row, t) of a
 * (36, rows, ld) block is at xi * xi_stride + row * ld + t, for tile t of the
 * current range.  Tiles are numbered over the batch, t = (n * TH + th) * TW + tw,
 * so that one range of tiles may span several small images.
 *
 * _winograd_kernels.h holds the code (with _winograd_tiles.h and
 * _winograd_filters.h); it is included once per element type and vector width
 * (64 or 32 bytes, picked when called: _multiversion.h).  The kernels use GCC's
 * vector extensions; they are compiled for baseline x86-64 and, where GCC can
 * dispatch at load time, also for x86-64-v3 (AVX2 + FMA) and v4 (AVX-512).
 */
#ifndef CYCONV_WINOGRAD_H
#define CYCONV_WINOGRAD_H
#include <stddef.h>
#include <string.h>

#include "_activate.h"

/* Outputs per tile side, and transformed positions per tile ((TILE + 2)^2). */
#define WINOGRAD_TILE 4
#define WINOGRAD_POSITIONS 36
/* 1/6 and 1/24 of G, by which the filter transforms multiply (cheaper than dividing) */
#define WINOGRAD_SIXTH (1.0 / 6)
#define WINOGRAD_TWENTY_FOURTH (1.0 / 24)
/* Tiles per column block of the forward product; tile ranges are padded to it. */
#define WINOGRAD_TILE_BLOCK 32
/* Output channels per block of the forward product (the packed weight's row block). */
#define WINOGRAD_CHANNEL_BLOCK 8
/* Elements a row of the transforms' workspace extends past the tiles it holds
 * (vector loads read up to a vector past the end, at most 64 bytes of float;
 * also the slack the forward's product block needs past its end, read by the
 * output transform). */
#define WINOGRAD_ROW_SLACK 16
/* Tiles the transforms gather at a time (from as many tile rows and images as
 * they span), so that their vectors are full however narrow the images; the
 * gathered taps (36 of them) are rows of GATHER_LD elements. */
#define WINOGRAD_GATHER_TILES 64
#define WINOGRAD_GATHER_LD (WINOGRAD_GATHER_TILES + WINOGRAD_ROW_SLACK)
#define WINOGRAD_GATHER_SIZE (WINOGRAD_POSITIONS * WINOGRAD_GATHER_LD)
/* Bytes of the partial sums each element of the thin layers' weight-gradient
 * product keeps (one lane per tile mod that many): a 64-byte vector. */
#define WINOGRAD_GRAD_LANE_BYTES 64
/* Elements between the positions of a block of transformed tiles past its rows: with
 * the rows' length often a multiple of 4 KB, the 36 positions a transform writes at
 * once would otherwise share a handful of L1 cache sets. */
#define WINOGRAD_POSITION_PAD 16

#include "_multiversion.h"

#define WT float
#define WMASK int
#define WINOGRAD_VECTOR_BYTES 64
#define WSUF(name) name##_float_v64
#include "_winograd_kernels.h"
#undef WSUF
#undef WINOGRAD_VECTOR_BYTES
#define WINOGRAD_VECTOR_BYTES 32
#define WSUF(name) name##_float_v32
#include "_winograd_kernels.h"
#undef WSUF
#undef WINOGRAD_VECTOR_BYTES
#undef WT
#undef WMASK

#define WT double
#define WMASK long long
#define WINOGRAD_VECTOR_BYTES 64
#define WSUF(name) name##_double_v64
#include "_winograd_kernels.h"
#undef WSUF
#undef WINOGRAD_VECTOR_BYTES
#define WINOGRAD_VECTOR_BYTES 32
#define WSUF(name) name##_double_v32
#include "_winograd_kernels.h"
#undef WSUF
#undef WINOGRAD_VECTOR_BYTES
#undef WT
#undef WMASK

/* One name for the four versions of a kernel: the element type picked by the
 * type of the first (pointer) argument at compile time (as _typed.h does), the
 * vector width by the CPU at run time. */
#define WINOGRAD_WIDTH(name, T) (cyconv_wide_vectors() ? name##_##T##_v64 : name##_##T##_v32)
#define WINOGRAD_TYPED(name, first, ...)                                                     \
    _Generic((first), float *: WINOGRAD_WIDTH(name, float),                                  \
             const float *: WINOGRAD_WIDTH(name, float),                                     \
             double *: WINOGRAD_WIDTH(name, double),                                         \
             const double *: WINOGRAD_WIDTH(name, double))(first, __VA_ARGS__)
#define winograd_transform(plane, ...) WINOGRAD_TYPED(winograd_transform, plane, __VA_ARGS__)
#define winograd_output(src, ...) WINOGRAD_TYPED(winograd_output, src, __VA_ARGS__)
#define winograd_filters(g, ...) WINOGRAD_TYPED(winograd_filters, g, __VA_ARGS__)
#define winograd_filter_grads(src, ...) WINOGRAD_TYPED(winograd_filter_grads, src, __VA_ARGS__)
#define winograd_product(u, ...) WINOGRAD_TYPED(winograd_product, u, __VA_ARGS__)
#define winograd_grad_lanes(d, ...) WINOGRAD_TYPED(winograd_grad_lanes, d, __VA_ARGS__)
#define winograd_grad_lanes_sum(lanes, ...) \
    WINOGRAD_TYPED(winograd_grad_lanes_sum, lanes, __VA_ARGS__)

#endif
