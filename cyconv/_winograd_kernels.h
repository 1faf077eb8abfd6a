/* Winograd F(2x2, 3x3) kernels for one element type; see _winograd.h, which
 * includes this file with WT = float and WT = double (WSUF names each copy).
 * A tile range [t0, t1) is walked one tile row (n, th, tw0..tw1) at a time. */

#if defined(__GNUC__)
typedef WT WSUF(wvec) __attribute__((vector_size(WINOGRAD_VECTOR_BYTES), aligned(sizeof(WT))));
typedef WMASK WSUF(wmask) __attribute__((vector_size(WINOGRAD_VECTOR_BYTES)));
#define WLANES ((int)(WINOGRAD_VECTOR_BYTES / sizeof(WT)))

/* the activation of code act, keeping NaN (0 none, 1 max(v, 0), 2 min(max(v, 0), 6)):
 * clear the lanes that are <= 0, then (code 2) set those >= 6 */
WINOGRAD_INLINE WSUF(wvec) WSUF(wactivate)(WSUF(wvec) v, int act)
{
    if (act)
        v = (WSUF(wvec))((WSUF(wmask))v & ~(WSUF(wmask))(v <= 0));
    if (act == 2) {
        WSUF(wmask) high = (WSUF(wmask))(v >= 6);
        v = (WSUF(wvec))(((WSUF(wmask))v & ~high) | ((WSUF(wmask))((WSUF(wvec)){0} + 6) & high));
    }
    return v;
}
#else
typedef WT WSUF(wvec); /* other compilers: one lane */
#define WLANES 1

WINOGRAD_INLINE WT WSUF(wactivate)(WT v, int act)
{
    return act == 0 ? v : v <= 0 ? 0 : (act == 2 && v >= 6) ? 6 : v;
}
#endif

WINOGRAD_INLINE WSUF(wvec) WSUF(wload)(const WT *p)
{
    return *(const WSUF(wvec) *)p;
}

/* p[l] = v[l] for l < n (all lanes when n >= WLANES) */
WINOGRAD_INLINE void WSUF(wstore)(WT *p, WSUF(wvec) v, int n)
{
    if (n >= WLANES)
        *(WSUF(wvec) *)p = v;
    else
        memcpy(p, &v, n * sizeof(WT));
}

/* the value a transform reads at column col of a row (src; msk: the mask's row, or
 * NULL): 0 outside [0, W) or where the mask is <= 0 */
WINOGRAD_INLINE WT WSUF(winograd_read)(const WT *src, const WT *msk, int col, int W)
{
    if (col < 0 || col >= W)
        return 0;
    return msk && !(msk[col] > 0) ? 0 : src[col];
}

/* even[m] = s[2*m], odd[m] = s[2*m + 1] for m in [m, hi); returns hi */
WINOGRAD_INLINE int WSUF(winograd_split)(const WT *restrict s, int m, int hi, WT *restrict even,
                                         WT *restrict odd)
{
#if defined(__GNUC__) && !defined(__clang__)
    WSUF(wmask) pick_even, pick_odd; /* GCC's two-vector shuffle: whole vectors at a time */
    for (int l = 0; l < WLANES; l++) {
        pick_even[l] = 2 * l;
        pick_odd[l] = 2 * l + 1;
    }
    for (; m + WLANES <= hi; m += WLANES) {
        WSUF(wvec) a = WSUF(wload)(s + 2 * m), b = WSUF(wload)(s + 2 * m + WLANES);
        *(WSUF(wvec) *)(even + m) = __builtin_shuffle(a, b, pick_even);
        *(WSUF(wvec) *)(odd + m) = __builtin_shuffle(a, b, pick_odd);
    }
#endif
    for (; m < hi; m++) {
        even[m] = s[2 * m];
        odd[m] = s[2 * m + 1];
    }
    return hi;
}

/* rows[(2*i + p) * width + m] = plane[row0 + i, col0 + 2*m + p] for i < nrows, p < 2,
 * m < half: the rows a run of tiles reads, split into even and odd columns so that
 * every tap is a unit-stride run; 0 outside the (H, W) plane, and 0 where
 * mask <= 0 when a mask (the forward output of a fused ReLU) is given.  Elements
 * [half, width) of each row are left as they are (vector loads read them, and the
 * lanes that do are dropped). */
WINOGRAD_INLINE void WSUF(winograd_load_rows)(const WT *plane, const WT *mask, int H, int W,
                                              int row0, int nrows, int col0, int half,
                                              int width, WT *rows)
{
    /* m in [lo, hi): both columns col0 + 2*m and col0 + 2*m + 1 inside the row */
    int lo = col0 >= 0 ? 0 : (1 - col0) / 2, hi = (W - col0) / 2;
    hi = hi < half ? hi : half;
    lo = lo < hi ? lo : hi;
    for (int i = 0; i < nrows; i++) {
        int r = row0 + i;
        WT *restrict even = rows + 2 * i * width, *restrict odd = even + width;
        if (r < 0 || r >= H) {
            memset(even, 0, half * sizeof(WT));
            memset(odd, 0, half * sizeof(WT));
            continue;
        }
        const WT *src = plane + (ptrdiff_t)r * W, *msk = mask ? mask + (ptrdiff_t)r * W : NULL;
        for (int m = 0; m < half; m++) {
            if (m == lo && !msk) /* the interior: no bounds checks */
                m = WSUF(winograd_split)(src + col0, m, hi, even, odd);
            else if (m == lo)
                for (; m < hi; m++) {
                    even[m] = msk[col0 + 2 * m] > 0 ? src[col0 + 2 * m] : 0;
                    odd[m] = msk[col0 + 2 * m + 1] > 0 ? src[col0 + 2 * m + 1] : 0;
                }
            if (m == half)
                break;
            even[m] = WSUF(winograd_read)(src, msk, col0 + 2 * m, W);
            odd[m] = WSUF(winograd_read)(src, msk, col0 + 2 * m + 1, W);
        }
    }
}

/* dst[xi * xi_stride + k] = (B^T d_k B)[xi] for the count tiles of one tile row,
 * d_k[i][j] = rows[i][2*k + j] (rows as winograd_load_rows made them, nrows 4),
 * WLANES tiles at a time. */
WINOGRAD_INLINE void WSUF(winograd_input_row)(const WT *rows, int width, int count, WT *dst,
                                     ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k += WLANES) {
        WSUF(wvec) r[4][4];
        for (int j = 0; j < 4; j++) { /* B^T d: combine the patch's rows */
            const WT *tap = rows + (j & 1) * width + k + (j >> 1);
            WSUF(wvec) d0 = WSUF(wload)(tap), d1 = WSUF(wload)(tap + 2 * width);
            WSUF(wvec) d2 = WSUF(wload)(tap + 4 * width), d3 = WSUF(wload)(tap + 6 * width);
            r[0][j] = d0 - d2;
            r[1][j] = d1 + d2;
            r[2][j] = d2 - d1;
            r[3][j] = d1 - d3;
        }
        for (int a = 0; a < 4; a++) { /* (B^T d) B: then its columns */
            WT *out = dst + 4 * a * xi_stride + k;
            WSUF(wstore)(out, r[a][0] - r[a][2], count - k);
            WSUF(wstore)(out + xi_stride, r[a][1] + r[a][2], count - k);
            WSUF(wstore)(out + 2 * xi_stride, r[a][2] - r[a][1], count - k);
            WSUF(wstore)(out + 3 * xi_stride, r[a][1] - r[a][3], count - k);
        }
    }
}

/* dst[xi * xi_stride + k] = (A y_k A^T)[xi] for the count tiles of one tile row,
 * y_k[i][j] = rows[i][2*k + j] (the 2x2 output gradient of tile k; nrows 2). */
WINOGRAD_INLINE void WSUF(winograd_grad_row)(const WT *rows, int width, int count, WT *dst,
                                    ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k += WLANES) {
        WSUF(wvec) e[4][2];
        for (int j = 0; j < 2; j++) { /* A y */
            WSUF(wvec) y0 = WSUF(wload)(rows + j * width + k);
            WSUF(wvec) y1 = WSUF(wload)(rows + (2 + j) * width + k);
            e[0][j] = y0;
            e[1][j] = y0 + y1;
            e[2][j] = y0 - y1;
            e[3][j] = -y1;
        }
        for (int a = 0; a < 4; a++) { /* (A y) A^T */
            WT *out = dst + 4 * a * xi_stride + k;
            WSUF(wstore)(out, e[a][0], count - k);
            WSUF(wstore)(out + xi_stride, e[a][0] + e[a][1], count - k);
            WSUF(wstore)(out + 2 * xi_stride, e[a][0] - e[a][1], count - k);
            WSUF(wstore)(out + 3 * xi_stride, -e[a][1], count - k);
        }
    }
}

/* dst[xi * xi_stride + t - t0] for tiles t in [t0, t1) of one channel (channel c of
 * image 0 at plane, images image_stride apart; mask likewise, or NULL), and zeros
 * for t in [t1, t0 + padded).  grad: the 2x2 output-gradient transform (rows
 * 2*th - pad_h + i, i < 2), else the 4x4 input transform (i < 4).  rows: a
 * workspace of WINOGRAD_ROWS(TW) elements. */
WINOGRAD_MULTIVERSION
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
        int width = count + 1 + WINOGRAD_ROW_SLACK; /* vector loads may read past count + 1 */
        WSUF(winograd_load_rows)(plane + n * image_stride, mask ? mask + n * image_stride : NULL,
                                 H, W, 2 * th - pad_h, grad ? 2 : 4, 2 * tw0 - pad_w, count + 1,
                                 width, rows);
        if (grad)
            WSUF(winograd_grad_row)(rows, width, count, dst + (t - t0), xi_stride);
        else
            WSUF(winograd_input_row)(rows, width, count, dst + (t - t0), xi_stride);
        t += count;
    }
    for (int xi = 0; xi < 16; xi++)
        memset(dst + xi * xi_stride + (t1 - t0), 0, (padded - (t1 - t0)) * sizeof(WT));
}

/* y[2*l + j] = o[j][l] for 2*l + j < n: the two output columns of WLANES tiles */
WINOGRAD_INLINE void WSUF(winograd_store_pairs)(WT *y, WSUF(wvec) even, WSUF(wvec) odd, int n)
{
    WT pairs[2 * WLANES];
    for (int l = 0; l < WLANES; l++) {
        pairs[2 * l] = even[l];
        pairs[2 * l + 1] = odd[l];
    }
    memcpy(y, pairs, (n < 2 * WLANES ? n : 2 * WLANES) * sizeof(WT));
}

/* out[n, 2*th + i, 2*tw + j] = act(bias + (A^T m A)[i][j]) for tiles t in [t0, t1) of
 * one channel, m[xi] = src[xi * xi_stride + t - t0] (src is read up to WLANES - 1
 * elements past t1 - t0); outputs past (OH, OW) are dropped; act: the activation of
 * that code (wactivate).  out: channel c of image 0, images image_stride apart. */
WINOGRAD_MULTIVERSION
static void WSUF(winograd_output)(const WT *src, ptrdiff_t xi_stride, WT bias, int act,
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
        for (int k = 0; k < count; k += WLANES) {
            WSUF(wvec) s[2][4];
            for (int b = 0; b < 4; b++) { /* A^T m */
                WSUF(wvec) m0 = WSUF(wload)(m + b * xi_stride + k);
                WSUF(wvec) m1 = WSUF(wload)(m + (4 + b) * xi_stride + k);
                WSUF(wvec) m2 = WSUF(wload)(m + (8 + b) * xi_stride + k);
                WSUF(wvec) m3 = WSUF(wload)(m + (12 + b) * xi_stride + k);
                s[0][b] = m0 + m1 + m2;
                s[1][b] = m1 - m2 - m3;
            }
            int ow = 2 * (tw0 + k), columns = 2 * (count - k) < OW - ow ? 2 * (count - k)
                                                                         : OW - ow;
            for (int i = 0; i < rows; i++) { /* (A^T m) A */
                WSUF(wvec) even = bias + (s[i][0] + s[i][1] + s[i][2]);
                WSUF(wvec) odd = bias + (s[i][1] - s[i][2] - s[i][3]);
                even = WSUF(wactivate)(even, act);
                odd = WSUF(wactivate)(odd, act);
                WSUF(winograd_store_pairs)(out + n * image_stride + (ptrdiff_t)(2 * th + i) * OW
                                           + ow, even, odd, columns);
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
/* c[i * ldc + j] = sum_k a[k * CHANNEL_BLOCK + i] * b[k * ldb + j] for
 * i < WINOGRAD_CHANNEL_BLOCK, j < TILE_BLOCK: one register block of the forward
 * product (outer products, two vectors of tiles per row). */
WINOGRAD_INLINE void WSUF(winograd_block)(
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

#undef WLANES
