/* Winograd F(2x2, 3x3) kernels for one element type; see _winograd.h, which
 * includes this file with WT = float and WT = double (WSUF names each copy).
 * A tile range [t0, t1) is walked one tile row (n, th, tw0..tw1) at a time. */

/* rows[(2*i + p) * half + m] = plane[row0 + i, col0 + 2*m + p] for i < nrows, p < 2,
 * m < half: the rows a run of tiles reads, split into even and odd columns so that
 * every tap is a unit-stride run; 0 outside the (H, W) plane, and 0 where
 * mask <= 0 when a mask (the forward output of a fused ReLU) is given. */
static void WSUF(winograd_load_rows)(const WT *plane, const WT *mask, int H, int W, int row0,
                                     int nrows, int col0, int half, WT *rows)
{
    for (int i = 0; i < nrows; i++) {
        int r = row0 + i;
        for (int p = 0; p < 2; p++) {
            WT *dst = rows + (2 * i + p) * half;
            if (r < 0 || r >= H) {
                memset(dst, 0, half * sizeof(WT));
                continue;
            }
            const WT *src = plane + (ptrdiff_t)r * W;
            const WT *msk = mask ? mask + (ptrdiff_t)r * W : NULL;
            for (int m = 0; m < half; m++) {
                int col = col0 + 2 * m + p;
                WT v = (col >= 0 && col < W) ? src[col] : 0;
                dst[m] = (msk && !(col >= 0 && col < W && msk[col] > 0)) ? 0 : v;
            }
        }
    }
}

/* dst[xi * xi_stride + k] = (B^T d_k B)[xi] for the count tiles of one tile row,
 * d_k[i][j] = rows[i][2*k + j] (rows as winograd_load_rows made them, nrows 4). */
static void WSUF(winograd_input_row)(const WT *rows, int half, int count, WT *dst,
                                     ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k++) {
        WT r[4][4];
        for (int j = 0; j < 4; j++) { /* B^T d: combine the patch's rows */
            WT d0 = rows[(0 + (j & 1)) * half + k + (j >> 1)];
            WT d1 = rows[(2 + (j & 1)) * half + k + (j >> 1)];
            WT d2 = rows[(4 + (j & 1)) * half + k + (j >> 1)];
            WT d3 = rows[(6 + (j & 1)) * half + k + (j >> 1)];
            r[0][j] = d0 - d2;
            r[1][j] = d1 + d2;
            r[2][j] = d2 - d1;
            r[3][j] = d1 - d3;
        }
        for (int a = 0; a < 4; a++) { /* (B^T d) B: then its columns */
            WT *out = dst + 4 * a * xi_stride + k;
            out[0] = r[a][0] - r[a][2];
            out[xi_stride] = r[a][1] + r[a][2];
            out[2 * xi_stride] = r[a][2] - r[a][1];
            out[3 * xi_stride] = r[a][1] - r[a][3];
        }
    }
}

/* dst[xi * xi_stride + k] = (A y_k A^T)[xi] for the count tiles of one tile row,
 * y_k[i][j] = rows[i][2*k + j] (the 2x2 output gradient of tile k; nrows 2). */
static void WSUF(winograd_grad_row)(const WT *rows, int half, int count, WT *dst,
                                    ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k++) {
        WT e[4][2];
        for (int j = 0; j < 2; j++) { /* A y */
            WT y0 = rows[j * half + k], y1 = rows[(2 + j) * half + k];
            e[0][j] = y0;
            e[1][j] = y0 + y1;
            e[2][j] = y0 - y1;
            e[3][j] = -y1;
        }
        for (int a = 0; a < 4; a++) { /* (A y) A^T */
            WT *out = dst + 4 * a * xi_stride + k;
            out[0] = e[a][0];
            out[xi_stride] = e[a][0] + e[a][1];
            out[2 * xi_stride] = e[a][0] - e[a][1];
            out[3 * xi_stride] = -e[a][1];
        }
    }
}

/* dst[xi * xi_stride + t - t0] for tiles t in [t0, t1) of one channel (channel c of
 * image 0 at plane, images image_stride apart; mask likewise, or NULL), and zeros
 * for t in [t1, t0 + padded).  grad: the 2x2 output-gradient transform (rows
 * 2*th - pad_h + i, i < 2), else the 4x4 input transform (i < 4).  rows: a
 * workspace of 8 * (TW + 2) elements. */
static void WSUF(winograd_transform)(const WT *plane, const WT *mask, ptrdiff_t image_stride,
                                     int H, int W, int pad_h, int pad_w, int TH, int TW,
                                     ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t padded, int grad,
                                     WT *rows, WT *dst, ptrdiff_t xi_stride)
{
    ptrdiff_t t = t0, image_tiles = (ptrdiff_t)TH * TW;
    while (t < t1) {
        ptrdiff_t n = t / image_tiles;
        int th = (int)(t / TW % TH), tw0 = (int)(t % TW);
        int count = (int)(t1 - t < TW - tw0 ? t1 - t : TW - tw0);
        int half = count + 1;
        WSUF(winograd_load_rows)(plane + n * image_stride, mask ? mask + n * image_stride : NULL,
                                 H, W, 2 * th - pad_h, grad ? 2 : 4, 2 * tw0 - pad_w, half,
                                 rows);
        if (grad)
            WSUF(winograd_grad_row)(rows, half, count, dst + (t - t0), xi_stride);
        else
            WSUF(winograd_input_row)(rows, half, count, dst + (t - t0), xi_stride);
        t += count;
    }
    for (int xi = 0; xi < 16; xi++)
        memset(dst + xi * xi_stride + (t1 - t0), 0, (padded - (t1 - t0)) * sizeof(WT));
}

/* out[n, 2*th + i, 2*tw + j] = act(bias + (A^T m A)[i][j]) for tiles t in [t0, t1) of
 * one channel, m[xi] = src[xi * xi_stride + t - t0]; outputs past (OH, OW) are
 * dropped; act = max(., 0) keeping NaN when relu.  out: channel c of image 0,
 * images image_stride apart. */
static void WSUF(winograd_output)(const WT *src, ptrdiff_t xi_stride, WT bias, int relu,
                                  int OH, int OW, int TH, int TW, ptrdiff_t t0, ptrdiff_t t1,
                                  WT *out, ptrdiff_t image_stride)
{
    ptrdiff_t t = t0, image_tiles = (ptrdiff_t)TH * TW;
    while (t < t1) {
        ptrdiff_t n = t / image_tiles;
        int th = (int)(t / TW % TH), tw0 = (int)(t % TW);
        int count = (int)(t1 - t < TW - tw0 ? t1 - t : TW - tw0);
        int rows = 2 * th + 1 < OH ? 2 : 1;
        const WT *m = src + (t - t0);
        for (int k = 0; k < count; k++) {
            WT s[2][4], o[2][2];
            for (int b = 0; b < 4; b++) { /* A^T m */
                WT m0 = m[b * xi_stride + k], m1 = m[(4 + b) * xi_stride + k];
                WT m2 = m[(8 + b) * xi_stride + k], m3 = m[(12 + b) * xi_stride + k];
                s[0][b] = m0 + m1 + m2;
                s[1][b] = m1 - m2 - m3;
            }
            for (int i = 0; i < 2; i++) { /* (A^T m) A */
                o[i][0] = bias + (s[i][0] + s[i][1] + s[i][2]);
                o[i][1] = bias + (s[i][1] - s[i][2] - s[i][3]);
                for (int j = 0; j < 2; j++)
                    if (relu)
                        o[i][j] = o[i][j] <= 0 ? 0 : o[i][j];
            }
            int ow = 2 * (tw0 + k);
            for (int i = 0; i < rows; i++) {
                WT *y = out + n * image_stride + (ptrdiff_t)(2 * th + i) * OW + ow;
                y[0] = o[i][0];
                if (ow + 1 < OW)
                    y[1] = o[i][1];
            }
        }
        t += count;
    }
}

/* u[xi * xi_stride] = (G g G^T)[xi] for one 3x3 filter g (tap (i, j) at
 * g[i * 3 + j], or at g[8 - 3*i - j] when flip), computed in double. */
static void WSUF(winograd_filter)(const WT *g, int flip, WT *u, ptrdiff_t xi_stride)
{
    double q[4][3];
    for (int j = 0; j < 3; j++) { /* G g */
        double g0 = g[flip ? 8 - j : j], g1 = g[flip ? 5 - j : 3 + j];
        double g2 = g[flip ? 2 - j : 6 + j];
        q[0][j] = g0;
        q[1][j] = 0.5 * (g0 + g1 + g2);
        q[2][j] = 0.5 * (g0 - g1 + g2);
        q[3][j] = g2;
    }
    for (int a = 0; a < 4; a++) { /* (G g) G^T */
        u[(4 * a) * xi_stride] = (WT)q[a][0];
        u[(4 * a + 1) * xi_stride] = (WT)(0.5 * (q[a][0] + q[a][1] + q[a][2]));
        u[(4 * a + 2) * xi_stride] = (WT)(0.5 * (q[a][0] - q[a][1] + q[a][2]));
        u[(4 * a + 3) * xi_stride] = (WT)q[a][2];
    }
}

/* grad[i * 3 + j] += (G^T m G)[i][j], m[xi] = src[xi * xi_stride]: the gradient of
 * one 3x3 filter from the gradient of its transform. */
static void WSUF(winograd_filter_grad)(const WT *src, ptrdiff_t xi_stride, WT *grad)
{
    WT h[3][4];
    for (int b = 0; b < 4; b++) { /* G^T m */
        WT m0 = src[b * xi_stride], m1 = src[(4 + b) * xi_stride];
        WT m2 = src[(8 + b) * xi_stride], m3 = src[(12 + b) * xi_stride];
        h[0][b] = m0 + (WT)0.5 * (m1 + m2);
        h[1][b] = (WT)0.5 * (m1 - m2);
        h[2][b] = (WT)0.5 * (m1 + m2) + m3;
    }
    for (int i = 0; i < 3; i++) { /* (G^T m) G */
        grad[3 * i] += h[i][0] + (WT)0.5 * (h[i][1] + h[i][2]);
        grad[3 * i + 1] += (WT)0.5 * (h[i][1] - h[i][2]);
        grad[3 * i + 2] += (WT)0.5 * (h[i][1] + h[i][2]) + h[i][3];
    }
}

#if defined(__GNUC__)
typedef WT WSUF(wvec) __attribute__((vector_size(WINOGRAD_VECTOR_BYTES), aligned(sizeof(WT))));
#define WLANES ((int)(WINOGRAD_VECTOR_BYTES / sizeof(WT)))

/* c[i * ldc + j] = sum_k a[k * CHANNEL_BLOCK + i] * b[k * ldb + j] for
 * i < WINOGRAD_CHANNEL_BLOCK, j < TILE_BLOCK: one register block of the forward
 * product (outer products, two vectors of tiles per row). */
static inline __attribute__((always_inline)) void WSUF(winograd_block)(
    const WT *a, const WT *b, ptrdiff_t ldb, int K, WT *c, ptrdiff_t ldc)
{
    enum { MR = WINOGRAD_CHANNEL_BLOCK, NV = WINOGRAD_TILE_BLOCK / WLANES };
    WSUF(wvec) acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = (WSUF(wvec)){0};
    for (int k = 0; k < K; k++) {
        WSUF(wvec) x[NV];
        for (int v = 0; v < NV; v++)
            x[v] = *(const WSUF(wvec) *)(b + k * ldb + v * WLANES);
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < NV; v++)
                acc[i][v] += a[k * MR + i] * x[v];
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            *(WSUF(wvec) *)(c + i * ldc + v * WLANES) = acc[i][v];
}

/* sum of the lanes of x, in a fixed order */
static inline WT WSUF(winograd_lane_sum)(WSUF(wvec) x)
{
    WT s = 0;
    for (int l = 0; l < WLANES; l++)
        s += x[l];
    return s;
}

/* m[i * ldm + j] += sum_k a[i * lda + k] * b[j * ldb + k] for i, j < GRAD_BLOCK,
 * k < K (a multiple of the vector lanes): one register block of the weight-gradient
 * product (dot products along tiles, lanes summed at the end). */
static inline __attribute__((always_inline)) void WSUF(winograd_dot_block)(
    const WT *a, ptrdiff_t lda, const WT *b, ptrdiff_t ldb, ptrdiff_t K, WT *m, ptrdiff_t ldm)
{
    enum { R = WINOGRAD_GRAD_BLOCK };
    WSUF(wvec) acc[R][R];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++)
            acc[i][j] = (WSUF(wvec)){0};
    for (ptrdiff_t k = 0; k < K; k += WLANES) {
        WSUF(wvec) x[R], y[R];
        for (int i = 0; i < R; i++) {
            x[i] = *(const WSUF(wvec) *)(a + i * lda + k);
            y[i] = *(const WSUF(wvec) *)(b + i * ldb + k);
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < R; j++)
                acc[i][j] += x[i] * y[j];
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++)
            m[i * ldm + j] += WSUF(winograd_lane_sum)(acc[i][j]);
}
#undef WLANES
#else
/* Other compilers: the same blocks as plain loops. */
static void WSUF(winograd_block)(const WT *a, const WT *b, ptrdiff_t ldb, int K, WT *c,
                                 ptrdiff_t ldc)
{
    for (int i = 0; i < WINOGRAD_CHANNEL_BLOCK; i++)
        for (int j = 0; j < WINOGRAD_TILE_BLOCK; j++) {
            WT s = 0;
            for (int k = 0; k < K; k++)
                s += a[k * WINOGRAD_CHANNEL_BLOCK + i] * b[k * ldb + j];
            c[i * ldc + j] = s;
        }
}

static void WSUF(winograd_dot_block)(const WT *a, ptrdiff_t lda, const WT *b, ptrdiff_t ldb,
                                     ptrdiff_t K, WT *m, ptrdiff_t ldm)
{
    for (int i = 0; i < WINOGRAD_GRAD_BLOCK; i++)
        for (int j = 0; j < WINOGRAD_GRAD_BLOCK; j++) {
            WT s = 0;
            for (ptrdiff_t k = 0; k < K; k++)
                s += a[i * lda + k] * b[j * ldb + k];
            m[i * ldm + j] += s;
        }
}
#endif

/* y[i * ldy + j] = sum_k u[(i / CB * K + k) * CB + i % CB] * v[k * ldv + j] for
 * i < M (a multiple of CB = WINOGRAD_CHANNEL_BLOCK), j < T (a multiple of
 * WINOGRAD_TILE_BLOCK): the forward product of one position xi, with u the
 * transformed weight packed in row blocks of CB output channels. */
WINOGRAD_MULTIVERSION
static void WSUF(winograd_product)(const WT *u, const WT *v, ptrdiff_t ldv, int M, int K,
                                   ptrdiff_t T, WT *y, ptrdiff_t ldy)
{
    for (ptrdiff_t j = 0; j < T; j += WINOGRAD_TILE_BLOCK)
        for (int i = 0; i < M; i += WINOGRAD_CHANNEL_BLOCK)
            WSUF(winograd_block)(u + (ptrdiff_t)i * K, v + j, ldv, K, y + i * ldy + j, ldy);
}

/* m[i * ldm + j] += sum_k a[i * ld + k] * b[j * ld + k] for i < GRAD_BLOCK rows of a,
 * j < N (a multiple of GRAD_BLOCK), k < K (a multiple of WINOGRAD_TILE_BLOCK): one row
 * block of the weight-gradient product of one position xi. */
WINOGRAD_MULTIVERSION
static void WSUF(winograd_grad_product)(const WT *a, const WT *b, ptrdiff_t ld, int N,
                                        ptrdiff_t K, WT *m, ptrdiff_t ldm)
{
    for (int j = 0; j < N; j += WINOGRAD_GRAD_BLOCK)
        WSUF(winograd_dot_block)(a, ld, b + j * ld, ld, K, m + j, ldm);
}
