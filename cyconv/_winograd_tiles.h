/* Winograd F(4x4, 3x3): the transforms of input, output-gradient and output tiles,
 * for one element type (included by _winograd_kernels.h, which defines WT, WSUF,
 * the vector type and the one-dimensional transforms).  A tile range [t0, t1) is
 * gathered WINOGRAD_GATHER_TILES tiles at a time, one tile row (n, th, tw0..tw1) after
 * another. */

/* the value a transform reads at column col of a row (src; msk: the mask's row, or
 * NULL): 0 outside [0, W) or where the mask is <= 0 */
CYCONV_ALWAYS_INLINE WT WSUF(winograd_read)(const WT *src, const WT *msk, int col, int W)
{
    if (col < 0 || col >= W)
        return 0;
    return msk && !(msk[col] > 0) ? 0 : src[col];
}

/* q[p * width + m] = s[4*m + p] for p < 4, m in [m, hi); returns hi */
CYCONV_ALWAYS_INLINE int WSUF(winograd_split)(const WT *restrict s, int m, int hi, WT *restrict q,
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_load_rows)(const WT *plane, const WT *mask, int H, int W,
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_gather)(const WT *plane, const WT *mask,
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_input_tiles)(const WT *taps, int count, WT *dst,
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_grad_tiles)(const WT *taps, int count, WT *dst,
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
CYCONV_MULTIVERSION
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_interleave)(const WT *q, int n, WT *out)
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_output_tiles)(const WT *src, ptrdiff_t xi_stride, int count,
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
CYCONV_MULTIVERSION
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
