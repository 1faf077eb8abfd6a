/* Winograd F(4x4, 3x3) kernels for one element type; see _winograd.h, which
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

/* The four one-dimensional transforms, on WLANES tiles at a time.  With the
 * interpolation points 0, 1, -1, 2, -2 (and infinity):
 *     B^T = [4  0 -5  0 1 0]    G = [ 1/4     0    0 ]    A^T = [1 1  1 1  1 0]
 *           [0 -4 -4  1 1 0]        [-1/6 -1/6 -1/6]          [0 1 -1 2 -2 0]
 *           [0  4 -4 -1 1 0]        [-1/6  1/6 -1/6]          [0 1  1 4  4 0]
 *           [0 -2 -1  2 1 0]        [1/24 1/12  1/6]          [0 1 -1 8 -8 1]
 *           [0  2 -1 -2 1 0]        [1/24 -1/12 1/6]
 *           [0  4  0 -5 0 1]        [   0     0    1] */

/* r = B^T d (d: a column or row of the 6x6 input patch) */
WINOGRAD_INLINE void WSUF(winograd_bt)(const WSUF(wvec) d[6], WSUF(wvec) r[6])
{
    WSUF(wvec) even = d[4] - (WT)4 * d[2], odd = d[3] - (WT)4 * d[1];
    WSUF(wvec) near = d[4] - d[2], far = (WT)2 * (d[3] - d[1]);
    r[0] = (WT)4 * d[0] - (WT)5 * d[2] + d[4];
    r[1] = even + odd;
    r[2] = even - odd;
    r[3] = near + far;
    r[4] = near - far;
    r[5] = (WT)4 * d[1] - (WT)5 * d[3] + d[5];
}

/* o = A^T m (m: a column or row of the 6x6 product of one tile) */
WINOGRAD_INLINE void WSUF(winograd_at)(const WSUF(wvec) m[6], WSUF(wvec) o[4])
{
    WSUF(wvec) sum12 = m[1] + m[2], diff12 = m[1] - m[2];
    WSUF(wvec) sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    o[0] = m[0] + sum12 + sum34;
    o[1] = diff12 + (WT)2 * diff34;
    o[2] = sum12 + (WT)4 * sum34;
    o[3] = diff12 + (WT)8 * diff34 + m[5];
}

/* e = A y (y: a column or row of the 4x4 output gradient of one tile) */
WINOGRAD_INLINE void WSUF(winograd_a)(const WSUF(wvec) y[4], WSUF(wvec) e[6])
{
    WSUF(wvec) sum02 = y[0] + y[2], sum13 = y[1] + y[3];
    WSUF(wvec) wide02 = y[0] + (WT)4 * y[2], wide13 = (WT)2 * y[1] + (WT)8 * y[3];
    e[0] = y[0];
    e[1] = sum02 + sum13;
    e[2] = sum02 - sum13;
    e[3] = wide02 + wide13;
    e[4] = wide02 - wide13;
    e[5] = y[3];
}

/* the value a transform reads at column col of a row (src; msk: the mask's row, or
 * NULL): 0 outside [0, W) or where the mask is <= 0 */
WINOGRAD_INLINE WT WSUF(winograd_read)(const WT *src, const WT *msk, int col, int W)
{
    if (col < 0 || col >= W)
        return 0;
    return msk && !(msk[col] > 0) ? 0 : src[col];
}

/* q[p * width + m] = s[4*m + p] for p < 4, m in [m, hi); returns hi */
WINOGRAD_INLINE int WSUF(winograd_split)(const WT *restrict s, int m, int hi, WT *restrict q,
                                         int width)
{
#if defined(__GNUC__) && !defined(__clang__)
    WSUF(wmask) pick_even, pick_odd; /* GCC's two-vector shuffle: whole vectors at a time */
    for (int l = 0; l < WLANES; l++) {
        pick_even[l] = 2 * l;
        pick_odd[l] = 2 * l + 1;
    }
    for (; m + WLANES <= hi; m += WLANES) { /* two rounds of even/odd splits */
        const WT *p = s + 4 * m;
        WSUF(wvec) a = WSUF(wload)(p), b = WSUF(wload)(p + WLANES);
        WSUF(wvec) c = WSUF(wload)(p + 2 * WLANES), d = WSUF(wload)(p + 3 * WLANES);
        WSUF(wvec) even0 = __builtin_shuffle(a, b, pick_even);
        WSUF(wvec) odd0 = __builtin_shuffle(a, b, pick_odd);
        WSUF(wvec) even1 = __builtin_shuffle(c, d, pick_even);
        WSUF(wvec) odd1 = __builtin_shuffle(c, d, pick_odd);
        *(WSUF(wvec) *)(q + m) = __builtin_shuffle(even0, even1, pick_even);
        *(WSUF(wvec) *)(q + width + m) = __builtin_shuffle(odd0, odd1, pick_even);
        *(WSUF(wvec) *)(q + 2 * width + m) = __builtin_shuffle(even0, even1, pick_odd);
        *(WSUF(wvec) *)(q + 3 * width + m) = __builtin_shuffle(odd0, odd1, pick_odd);
    }
    enum { G = WLANES / 4 }; /* then G at a time: one vector, transposed */
    WSUF(wmask) by_column;
    for (int i = 0; i < WLANES; i++)
        by_column[i] = 4 * (i % G) + i / G;
    for (; m + G <= hi; m += G) {
        WSUF(wvec) v = __builtin_shuffle(WSUF(wload)(s + 4 * m), by_column);
        for (int p = 0; p < 4; p++)
            memcpy(q + p * width + m, (WT *)&v + p * G, G * sizeof(WT));
    }
#endif
    for (; m < hi; m++)
        for (int p = 0; p < 4; p++)
            q[p * width + m] = s[4 * m + p];
    return hi;
}

/* rows[i * row_stride + p * width + m] = plane[row0 + i, col0 + 4*m + p] for
 * i < nrows, p < 4, m < quarter: the rows a run of tiles reads, split into columns
 * by their remainder mod 4 so that every tap is a unit-stride run; 0 outside the
 * (H, W) plane, and 0 where mask <= 0 when a mask (the forward output of a fused
 * ReLU) is given. */
WINOGRAD_INLINE void WSUF(winograd_load_rows)(const WT *plane, const WT *mask, int H, int W,
                                              int row0, int nrows, int col0, int quarter,
                                              WT *rows, ptrdiff_t row_stride, int width)
{
    /* m in [lo, hi): the columns col0 + 4*m + p, p < 4, all inside the row */
    int lo = col0 >= 0 ? 0 : (3 - col0) / 4, hi = W >= col0 ? (W - col0) / 4 : 0;
    hi = hi < quarter ? hi : quarter;
    lo = lo < hi ? lo : hi;
    for (int i = 0; i < nrows; i++) {
        int r = row0 + i;
        WT *q = rows + i * row_stride;
        if (r < 0 || r >= H) {
            for (int p = 0; p < 4; p++)
                memset(q + p * width, 0, quarter * sizeof(WT));
            continue;
        }
        const WT *src = plane + (ptrdiff_t)r * W, *msk = mask ? mask + (ptrdiff_t)r * W : NULL;
        for (int m = 0; m < quarter; m++) {
            if (m == lo && !msk) /* the interior: no bounds checks */
                m = WSUF(winograd_split)(src + col0, m, hi, q, width);
            else if (m == lo)
                for (; m < hi; m++)
                    for (int p = 0; p < 4; p++) {
                        int col = col0 + 4 * m + p;
                        q[p * width + m] = msk[col] > 0 ? src[col] : 0;
                    }
            if (m == quarter)
                break;
            for (int p = 0; p < 4; p++)
                q[p * width + m] = WSUF(winograd_read)(src, msk, col0 + 4 * m + p, W);
        }
    }
}

/* taps[(side*i + j) * WINOGRAD_GATHER_LD + k] = tap (i, j) of tile t + k, for the
 * tiles [t, t_end) (at most WINOGRAD_GATHER_TILES) of one channel: side 6 (the
 * 6x6 input patches, rows 4*th - pad_h + i) or 4 (grad: the 4x4 output-gradient
 * tiles).  Each tile row is split by winograd_load_rows straight into the taps
 * j < 4; its entry past the row's last tile lands on the next row's first slot,
 * which that row then writes, or in the slack past WINOGRAD_GATHER_TILES. */
WINOGRAD_INLINE void WSUF(winograd_gather)(const WT *plane, const WT *mask,
                                           ptrdiff_t image_stride, int H, int W, int pad_h,
                                           int pad_w, int TH, int TW, ptrdiff_t t,
                                           ptrdiff_t t_end, int grad, WT *taps)
{
    enum { LD = WINOGRAD_GATHER_LD };
    int side = grad ? 4 : 6;
    ptrdiff_t image_tiles = (ptrdiff_t)TH * TW;
    for (WT *slot = taps; t < t_end;) {
        ptrdiff_t n = t / image_tiles;
        int th = (int)(t / TW % TH), tw0 = (int)(t % TW);
        int count = (int)(t_end - t < TW - tw0 ? t_end - t : TW - tw0);
        WSUF(winograd_load_rows)(plane + n * image_stride, mask ? mask + n * image_stride : NULL,
                                 H, W, 4 * th - pad_h, side, 4 * tw0 - pad_w,
                                 grad ? count : count + 1, slot, side * LD, LD);
        for (int i = 0; i < side && !grad; i++) /* taps 4 and 5: taps 0 and 1 of the next tile */
            for (int j = 4; j < 6; j++)
                memcpy(slot + (6 * i + j) * LD, slot + (6 * i + j - 4) * LD + 1,
                       count * sizeof(WT));
        slot += count;
        t += count;
    }
}

/* dst[xi * xi_stride + k] = (B^T d_k B)[xi] for count tiles, d_k[i][j] =
 * taps[(6*i + j) * WINOGRAD_GATHER_LD + k], WLANES tiles at a time. */
WINOGRAD_INLINE void WSUF(winograd_input_tiles)(const WT *taps, int count, WT *dst,
                                                ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k += WLANES) {
        WSUF(wvec) column[6][6], d[6], r[6];
        for (int j = 0; j < 6; j++) { /* B^T d: combine the patch's rows */
            for (int i = 0; i < 6; i++)
                d[i] = WSUF(wload)(taps + (6 * i + j) * WINOGRAD_GATHER_LD + k);
            WSUF(winograd_bt)(d, column[j]);
        }
        for (int a = 0; a < 6; a++) { /* (B^T d) B: then its columns */
            for (int j = 0; j < 6; j++)
                d[j] = column[j][a];
            WSUF(winograd_bt)(d, r);
            for (int b = 0; b < 6; b++)
                WSUF(wstore)(dst + (6 * a + b) * xi_stride + k, r[b], count - k);
        }
    }
}

/* dst[xi * xi_stride + k] = (A y_k A^T)[xi] for count tiles, y_k[i][j] =
 * taps[(4*i + j) * WINOGRAD_GATHER_LD + k] (the 4x4 output gradient of tile k). */
WINOGRAD_INLINE void WSUF(winograd_grad_tiles)(const WT *taps, int count, WT *dst,
                                               ptrdiff_t xi_stride)
{
    for (int k = 0; k < count; k += WLANES) {
        WSUF(wvec) column[4][6], y[6], e[6];
        for (int j = 0; j < 4; j++) { /* A y */
            for (int i = 0; i < 4; i++)
                y[i] = WSUF(wload)(taps + (4 * i + j) * WINOGRAD_GATHER_LD + k);
            WSUF(winograd_a)(y, column[j]);
        }
        for (int a = 0; a < 6; a++) { /* (A y) A^T */
            for (int j = 0; j < 4; j++)
                y[j] = column[j][a];
            WSUF(winograd_a)(y, e);
            for (int b = 0; b < 6; b++)
                WSUF(wstore)(dst + (6 * a + b) * xi_stride + k, e[b], count - k);
        }
    }
}

/* dst[xi * xi_stride + t - t0] for tiles t in [t0, t1) of one channel (channel c of
 * image 0 at plane, images image_stride apart; mask likewise, or NULL), and zeros
 * for t in [t1, t0 + padded).  grad: the 4x4 output-gradient transform (rows
 * 4*th - pad_h + i, i < 4), else the 6x6 input transform (i < 6).  taps: a
 * workspace of WINOGRAD_GATHER_SIZE elements. */
WINOGRAD_MULTIVERSION
static void WSUF(winograd_transform)(const WT *plane, const WT *mask, ptrdiff_t image_stride,
                                     int H, int W, int pad_h, int pad_w, int TH, int TW,
                                     ptrdiff_t t0, ptrdiff_t t1, ptrdiff_t padded, int grad,
                                     WT *taps, WT *dst, ptrdiff_t xi_stride)
{
    for (ptrdiff_t t = t0; t < t1; t += WINOGRAD_GATHER_TILES) {
        ptrdiff_t t_end = t1 - t < WINOGRAD_GATHER_TILES ? t1 : t + WINOGRAD_GATHER_TILES;
        WSUF(winograd_gather)(plane, mask, image_stride, H, W, pad_h, pad_w, TH, TW, t, t_end,
                              grad, taps);
        if (grad)
            WSUF(winograd_grad_tiles)(taps, (int)(t_end - t), dst + (t - t0), xi_stride);
        else
            WSUF(winograd_input_tiles)(taps, (int)(t_end - t), dst + (t - t0), xi_stride);
    }
    for (int xi = 0; xi < WINOGRAD_POSITIONS; xi++)
        memset(dst + xi * xi_stride + (t1 - t0), 0, (padded - (t1 - t0)) * sizeof(WT));
}

/* out[4*l + j] = q[j * WINOGRAD_GATHER_LD + l] for 4*l + j < n: four output columns
 * interleaved into an output row, WLANES tiles at a time */
WINOGRAD_INLINE void WSUF(winograd_interleave)(const WT *q, int n, WT *out)
{
    int l = 0;
#if defined(__GNUC__) && !defined(__clang__)
    WSUF(wmask) low, high; /* zip the first, or the second, halves of two vectors */
    for (int i = 0; i < WLANES; i++) {
        low[i] = (i & 1) * WLANES + i / 2;
        high[i] = (i & 1) * WLANES + WLANES / 2 + i / 2;
    }
    for (; 4 * (l + WLANES) <= n; l += WLANES) {
        WSUF(wvec) q0 = WSUF(wload)(q + l), q1 = WSUF(wload)(q + WINOGRAD_GATHER_LD + l);
        WSUF(wvec) q2 = WSUF(wload)(q + 2 * WINOGRAD_GATHER_LD + l);
        WSUF(wvec) q3 = WSUF(wload)(q + 3 * WINOGRAD_GATHER_LD + l);
        WSUF(wvec) a = __builtin_shuffle(q0, q2, low), b = __builtin_shuffle(q0, q2, high);
        WSUF(wvec) c = __builtin_shuffle(q1, q3, low), d = __builtin_shuffle(q1, q3, high);
        WT *o = out + 4 * l;
        *(WSUF(wvec) *)o = __builtin_shuffle(a, c, low);
        *(WSUF(wvec) *)(o + WLANES) = __builtin_shuffle(a, c, high);
        *(WSUF(wvec) *)(o + 2 * WLANES) = __builtin_shuffle(b, d, low);
        *(WSUF(wvec) *)(o + 3 * WLANES) = __builtin_shuffle(b, d, high);
    }
    enum { G = WLANES / 4 }; /* then G at a time: one vector, transposed */
    WSUF(wmask) by_tile;
    for (int i = 0; i < WLANES; i++)
        by_tile[i] = (i % 4) * G + i / 4;
    for (; 4 * (l + G) <= n; l += G) {
        WT pieces[WLANES];
        for (int j = 0; j < 4; j++)
            memcpy(pieces + j * G, q + j * WINOGRAD_GATHER_LD + l, G * sizeof(WT));
        *(WSUF(wvec) *)(out + 4 * l) = __builtin_shuffle(WSUF(wload)(pieces), by_tile);
    }
#endif
    for (int e = 4 * l; e < n; e++)
        out[e] = q[(e & 3) * WINOGRAD_GATHER_LD + e / 4];
}

/* q[(4*i + j) * WINOGRAD_GATHER_LD + k] = act(bias + (A^T m_k A)[i][j]) for count
 * tiles, m_k[xi] = src[xi * xi_stride + k] (src is read up to WLANES - 1 elements
 * past count) */
WINOGRAD_INLINE void WSUF(winograd_output_tiles)(const WT *src, ptrdiff_t xi_stride, int count,
                                                 WT bias, int act, WT *q)
{
    for (int k = 0; k < count; k += WLANES) {
        WSUF(wvec) row[4][6], column[6], o[4];
        for (int b = 0; b < 6; b++) { /* A^T m */
            for (int a = 0; a < 6; a++)
                column[a] = WSUF(wload)(src + (6 * a + b) * xi_stride + k);
            WSUF(winograd_at)(column, o);
            for (int i = 0; i < 4; i++)
                row[i][b] = o[i];
        }
        for (int i = 0; i < 4; i++) { /* (A^T m) A */
            WSUF(winograd_at)(row[i], o);
            for (int j = 0; j < 4; j++)
                *(WSUF(wvec) *)(q + (4 * i + j) * WINOGRAD_GATHER_LD + k) =
                    WSUF(wactivate)(bias + o[j], act);
        }
    }
}

/* out[n, 4*th + i, 4*tw + j] = act(bias + (A^T m A)[i][j]) for tiles t in [t0, t1) of
 * one channel, m[xi] = src[xi * xi_stride + t - t0] (src is read up to WLANES - 1
 * elements past t1 - t0); outputs past (OH, OW) are dropped; act: the activation of
 * that code (wactivate).  out: channel c of image 0, images image_stride apart.
 * q: a workspace of WINOGRAD_GATHER_SIZE elements. */
WINOGRAD_MULTIVERSION
static void WSUF(winograd_output)(const WT *src, ptrdiff_t xi_stride, WT bias, int act,
                                  int OH, int OW, int TH, int TW, ptrdiff_t t0, ptrdiff_t t1,
                                  WT *q, WT *out, ptrdiff_t image_stride)
{
    ptrdiff_t image_tiles = (ptrdiff_t)TH * TW;
    for (ptrdiff_t block = t0; block < t1; block += WINOGRAD_GATHER_TILES) {
        ptrdiff_t t = block;
        ptrdiff_t t_end = t1 - t < WINOGRAD_GATHER_TILES ? t1 : t + WINOGRAD_GATHER_TILES;
        WSUF(winograd_output_tiles)(src + (block - t0), xi_stride, (int)(t_end - block), bias,
                                    act, q);
        while (t < t_end) { /* scatter each tile row's outputs */
            ptrdiff_t n = t / image_tiles;
            int th = (int)(t / TW % TH), tw0 = (int)(t % TW);
            int count = (int)(t_end - t < TW - tw0 ? t_end - t : TW - tw0);
            int rows = OH - 4 * th < 4 ? OH - 4 * th : 4;
            int columns = 4 * count < OW - 4 * tw0 ? 4 * count : OW - 4 * tw0;
            for (int i = 0; i < rows; i++)
                WSUF(winograd_interleave)(q + 4 * i * WINOGRAD_GATHER_LD + (t - block), columns,
                                          out + n * image_stride
                                              + (ptrdiff_t)(4 * th + i) * OW + 4 * tw0);
            t += count;
        }
    }
}

/* The filter transforms take WINOGRAD_CHANNEL_BLOCK filters at a time (lane l:
 * filter l), in double; "lanes" are arrays of that many. */

/* r = G g for one column or row g of the filters */
WINOGRAD_INLINE void WSUF(winograd_g)(const double *g0, const double *g1, const double *g2,
                                      double r[6][WINOGRAD_CHANNEL_BLOCK])
{
    for (int l = 0; l < WINOGRAD_CHANNEL_BLOCK; l++) {
        double outer = g0[l] + 4 * g2[l], inner = 2 * g1[l];
        r[0][l] = 0.25 * g0[l];
        r[1][l] = -(g0[l] + g1[l] + g2[l]) * WINOGRAD_SIXTH;
        r[2][l] = -(g0[l] - g1[l] + g2[l]) * WINOGRAD_SIXTH;
        r[3][l] = (outer + inner) * WINOGRAD_TWENTY_FOURTH;
        r[4][l] = (outer - inner) * WINOGRAD_TWENTY_FOURTH;
        r[5][l] = g2[l];
    }
}

/* u[xi * xi_stride + l] = (G g_l G^T)[xi] for l < WINOGRAD_CHANNEL_BLOCK: the 3x3
 * filters g_l = g + l * filter_stride for l < count (tap (i, j) at [i * 3 + j], or
 * at [8 - 3*i - j] when flip), zero filters for l >= count. */
static void WSUF(winograd_filters)(const WT *g, ptrdiff_t filter_stride, int count, int flip,
                                   WT *u, ptrdiff_t xi_stride)
{
    enum { L = WINOGRAD_CHANNEL_BLOCK };
    double tap[9][L], column[3][6][L], row[6][L];
    for (int k = 0; k < 9; k++)
        for (int l = 0; l < L; l++)
            tap[k][l] = l < count ? g[l * filter_stride + (flip ? 8 - k : k)] : 0;
    for (int j = 0; j < 3; j++) /* G g */
        WSUF(winograd_g)(tap[j], tap[3 + j], tap[6 + j], column[j]);
    for (int a = 0; a < 6; a++) { /* (G g) G^T */
        WSUF(winograd_g)(column[0][a], column[1][a], column[2][a], row);
        for (int b = 0; b < 6; b++)
            for (int l = 0; l < L; l++)
                u[(6 * a + b) * xi_stride + l] = (WT)row[b][l];
    }
}

/* h = G^T m for one column or row m of the transformed filters' gradients */
WINOGRAD_INLINE void WSUF(winograd_gt)(double m[6][WINOGRAD_CHANNEL_BLOCK],
                                       double h[3][WINOGRAD_CHANNEL_BLOCK])
{
    for (int l = 0; l < WINOGRAD_CHANNEL_BLOCK; l++) {
        double sum12 = m[1][l] + m[2][l], sum34 = m[3][l] + m[4][l];
        h[0][l] = 0.25 * m[0][l] - sum12 * WINOGRAD_SIXTH + sum34 * WINOGRAD_TWENTY_FOURTH;
        h[1][l] = ((m[2][l] - m[1][l]) + 0.5 * (m[3][l] - m[4][l])) * WINOGRAD_SIXTH;
        h[2][l] = (sum34 - sum12) * WINOGRAD_SIXTH + m[5][l];
    }
}

/* grad_l[i * 3 + j] += (G^T m_l G)[i][j] for l < count, grad_l = grad + l * filter_stride,
 * m_l[xi] = src[xi * xi_stride + l]: the gradients of count 3x3 filters from those of
 * their transforms. */
static void WSUF(winograd_filter_grads)(const WT *src, ptrdiff_t xi_stride, int count, WT *grad,
                                        ptrdiff_t filter_stride)
{
    enum { L = WINOGRAD_CHANNEL_BLOCK };
    double m[6][L], column[6][3][L], h[3][L];
    for (int b = 0; b < 6; b++) { /* G^T m */
        for (int a = 0; a < 6; a++)
            for (int l = 0; l < L; l++)
                m[a][l] = l < count ? src[(6 * a + b) * xi_stride + l] : 0;
        WSUF(winograd_gt)(m, column[b]);
    }
    for (int i = 0; i < 3; i++) { /* (G^T m) G */
        for (int b = 0; b < 6; b++)
            memcpy(m[b], column[b][i], sizeof(m[b]));
        WSUF(winograd_gt)(m, h);
        for (int l = 0; l < count; l++)
            for (int j = 0; j < 3; j++)
                grad[l * filter_stride + 3 * i + j] += (WT)h[j][l];
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
