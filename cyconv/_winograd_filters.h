/* Winograd F(4x4, 3x3): the transforms of filters and of their gradients, and the
 * forward product, for one element type (included by _winograd_kernels.h, which
 * defines WT, WSUF and the vector type). */

/* The filter transforms take WINOGRAD_CHANNEL_BLOCK filters at a time (lane l:
 * filter l), in double; "lanes" are arrays of that many. */

/* r = G g for one column or row g of the filters */
CYCONV_ALWAYS_INLINE void WSUF(winograd_g)(const double *g0, const double *g1, const double *g2,
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_gt)(double m[6][WINOGRAD_CHANNEL_BLOCK],
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
/* Rows (output channels) and vectors of tiles of a register block of the forward
 * product: 8 rows by 2 vectors (16 accumulators) with 64-byte vectors, 4 rows by 3
 * vectors (12 of the 16 registers) with 32-byte ones (by 2, 8 accumulators, the
 * multiply-adds waited on each other); either way a part of a row block of the packed
 * weight.  Ranges of tiles that leave less than a whole block take blocks of 2 vectors
 * or 1 at their end. */
enum {
    WSUF(BLOCK_ROWS) = WINOGRAD_VECTOR_BYTES == 64 ? WINOGRAD_CHANNEL_BLOCK
                                                   : WINOGRAD_CHANNEL_BLOCK / 2,
    WSUF(BLOCK_VECTORS) = WINOGRAD_VECTOR_BYTES == 64 ? 2 : 3
};

/* c[i * ldc + j] = sum_k a[k * CHANNEL_BLOCK + i] * b[k * ldb + j] for
 * i < BLOCK_ROWS, j < vectors * WLANES: one register block of the forward product
 * (outer products, vectors (a constant once inlined) of tiles per row). */
CYCONV_ALWAYS_INLINE void WSUF(winograd_block)(
    const WT *a, const WT *b, ptrdiff_t ldb, int K, WT *c, ptrdiff_t ldc, const int vectors)
{
    enum { MR = WSUF(BLOCK_ROWS), NV = WSUF(BLOCK_VECTORS) };
    WSUF(wvec) acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < vectors; v++)
            acc[i][v] = (WSUF(wvec)){0};
    for (int k = 0; k < K; k++) {
        WSUF(wvec) x[NV];
        for (int v = 0; v < vectors; v++)
            x[v] = WSUF(wload)(b + k * ldb + v * WLANES);
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < vectors; v++)
                acc[i][v] += a[k * WINOGRAD_CHANNEL_BLOCK + i] * x[v];
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < vectors; v++)
            *(WSUF(wvec) *)(c + i * ldc + v * WLANES) = acc[i][v];
}

#else
/* Other compilers: the same blocks as plain loops, over vectors * WLANES tiles. */
enum { WSUF(BLOCK_ROWS) = WINOGRAD_CHANNEL_BLOCK, WSUF(BLOCK_VECTORS) = 1 };

static void WSUF(winograd_block)(const WT *a, const WT *b, ptrdiff_t ldb, int K, WT *c,
                                 ptrdiff_t ldc, int vectors)
{
    for (int i = 0; i < WINOGRAD_CHANNEL_BLOCK; i++)
        for (int j = 0; j < vectors * WLANES; j++) {
            WT s = 0;
            for (int k = 0; k < K; k++)
                s += a[k * WINOGRAD_CHANNEL_BLOCK + i] * b[k * ldb + j];
            c[i * ldc + j] = s;
        }
}
#endif

/* The weight gradient's product for thin layers (few channels, many tiles), where
 * a BLAS call per position and range costs more than it multiplies: each element
 * of dw = d v^T, a sum over tiles, is kept as WINOGRAD_GRAD_LANES partial sums
 * (lane l: the tiles t = l mod GRAD_LANES), WINOGRAD_GRAD_LANE_BYTES of them whatever
 * the vector width, so that both widths add the same numbers in the same order. */
#define WINOGRAD_GRAD_LANES ((int)(WINOGRAD_GRAD_LANE_BYTES / sizeof(WT)))

#if defined(__GNUC__)
enum { WSUF(GRAD_PARTS) = WINOGRAD_GRAD_LANES / WLANES }; /* vectors per 64 bytes */

/* lanes[(i * C + j) * GRAD_LANES + l] += sum over tiles t = l mod GRAD_LANES of
 * d[(m + i) * T + t] * v[(c + j) * T + t], for i < BM, j < BC: one register block. */
#define WINOGRAD_GRAD_BLOCK(NAME, BM, BC)                                                     \
    CYCONV_ALWAYS_INLINE void NAME(const WT *d, const WT *v, ptrdiff_t T, int C, WT *lanes)   \
    {                                                                                         \
        enum { P = WSUF(GRAD_PARTS) };                                                        \
        WSUF(wvec) acc[BM][BC][P];                                                            \
        for (int i = 0; i < BM; i++)                                                          \
            for (int j = 0; j < BC; j++)                                                      \
                for (int p = 0; p < P; p++)                                                   \
                    acc[i][j][p] = WSUF(wload)(lanes + (i * C + j) * WINOGRAD_GRAD_LANES      \
                                               + p * WLANES);                                 \
        for (ptrdiff_t t = 0; t < T; t += WINOGRAD_GRAD_LANES)                                \
            for (int p = 0; p < P; p++) {                                                     \
                WSUF(wvec) dv[BM], vv[BC];                                                    \
                for (int i = 0; i < BM; i++)                                                  \
                    dv[i] = WSUF(wload)(d + i * T + t + p * WLANES);                          \
                for (int j = 0; j < BC; j++)                                                  \
                    vv[j] = WSUF(wload)(v + j * T + t + p * WLANES);                          \
                for (int i = 0; i < BM; i++)                                                  \
                    for (int j = 0; j < BC; j++)                                              \
                        acc[i][j][p] += dv[i] * vv[j];                                        \
            }                                                                                 \
        for (int i = 0; i < BM; i++)                                                          \
            for (int j = 0; j < BC; j++)                                                      \
                for (int p = 0; p < P; p++)                                                   \
                    *(WSUF(wvec) *)(lanes + (i * C + j) * WINOGRAD_GRAD_LANES + p * WLANES) = \
                        acc[i][j][p];                                                         \
    }
/* the register block: 4 x 4 sums of one vector each with 64-byte vectors (16
 * accumulators), 3 x 2 of two vectors with 32-byte ones (12) */
enum {
    WSUF(GRAD_ROWS) = WINOGRAD_VECTOR_BYTES == 64 ? 4 : 3,
    WSUF(GRAD_COLUMNS) = WINOGRAD_VECTOR_BYTES == 64 ? 4 : 2
};
WINOGRAD_GRAD_BLOCK(WSUF(winograd_grad_block), WSUF(GRAD_ROWS), WSUF(GRAD_COLUMNS))
WINOGRAD_GRAD_BLOCK(WSUF(winograd_grad_single), 1, 1)
#undef WINOGRAD_GRAD_BLOCK

#else
/* Other compilers: the same sums, one element at a time. */
enum { WSUF(GRAD_ROWS) = 1, WSUF(GRAD_COLUMNS) = 1 };

static void WSUF(winograd_grad_single)(const WT *d, const WT *v, ptrdiff_t T, int C, WT *lanes)
{
    (void)C;
    for (ptrdiff_t t = 0; t < T; t++)
        lanes[t % WINOGRAD_GRAD_LANES] += d[t] * v[t];
}

static void WSUF(winograd_grad_block)(const WT *d, const WT *v, ptrdiff_t T, int C, WT *lanes)
{
    WSUF(winograd_grad_single)(d, v, T, C, lanes);
}
#endif

/* lanes[(i * C + j) * GRAD_LANES + l] += sum over tiles t = l mod GRAD_LANES of
 * d[i * T + t] * v[j * T + t] for i < M, j < C (T a multiple of GRAD_LANES): the
 * weight gradient's product of one position over one range of tiles, its
 * (M, C) sums in lanes. */
CYCONV_MULTIVERSION
static void WSUF(winograd_grad_lanes)(const WT *d, const WT *v, int M, int C, ptrdiff_t T,
                                      WT *lanes)
{
    enum { BM = WSUF(GRAD_ROWS), BC = WSUF(GRAD_COLUMNS) };
    int m_end = M - M % BM, c_end = C - C % BC;
#define WINOGRAD_LANES_AT(m, c) (lanes + ((ptrdiff_t)(m) * C + (c)) * WINOGRAD_GRAD_LANES)
    for (int m = 0; m < m_end; m += BM) {
        for (int c = 0; c < c_end; c += BC)
            WSUF(winograd_grad_block)(d + m * T, v + c * T, T, C, WINOGRAD_LANES_AT(m, c));
        for (int c = c_end; c < C; c++) /* the columns left over */
            for (int i = m; i < m + BM; i++)
                WSUF(winograd_grad_single)(d + i * T, v + c * T, T, C, WINOGRAD_LANES_AT(i, c));
    }
    for (int m = m_end; m < M; m++) /* the rows left over */
        for (int c = 0; c < C; c++)
            WSUF(winograd_grad_single)(d + m * T, v + c * T, T, C, WINOGRAD_LANES_AT(m, c));
#undef WINOGRAD_LANES_AT
}

/* dw[e] = the sum of lanes[e * GRAD_LANES + l] over l < GRAD_LANES, added in halves
 * (lanes l and l + half, half = GRAD_LANES / 2, ..., 1), for e < count. */
static void WSUF(winograd_grad_lanes_sum)(const WT *lanes, ptrdiff_t count, WT *dw)
{
    for (ptrdiff_t e = 0; e < count; e++) {
        WT sums[WINOGRAD_GRAD_LANES];
        memcpy(sums, lanes + e * WINOGRAD_GRAD_LANES, sizeof(sums));
        for (int half = WINOGRAD_GRAD_LANES / 2; half > 0; half /= 2)
            for (int l = 0; l < half; l++)
                sums[l] += sums[l + half];
        dw[e] = sums[0];
    }
}
#undef WINOGRAD_GRAD_LANES

/* y[i * ldy + j] = sum_k u[(i / CB * K + k) * CB + i % CB] * v[k * ldv + j] for
 * i < M (a multiple of CB = WINOGRAD_CHANNEL_BLOCK), j < T (a multiple of
 * WINOGRAD_TILE_BLOCK): the forward product of one position xi, with u the
 * transformed weight packed in row blocks of CB output channels. */
CYCONV_MULTIVERSION
static void WSUF(winograd_product)(const WT *u, const WT *v, ptrdiff_t ldv, int M, int K,
                                   ptrdiff_t T, WT *y, ptrdiff_t ldy)
{
    enum { NV = WSUF(BLOCK_VECTORS) };
    for (ptrdiff_t j = 0; j < T;) {
        /* vectors of tiles in this block (constants in each call, so that each inlines) */
        int vectors = T - j >= NV * WLANES ? NV : T - j >= 2 * WLANES ? 2 : 1;
        for (int i = 0; i < M; i += WSUF(BLOCK_ROWS)) {
            const WT *weight_rows = u + (ptrdiff_t)(i / WINOGRAD_CHANNEL_BLOCK) * K *
                                            WINOGRAD_CHANNEL_BLOCK + i % WINOGRAD_CHANNEL_BLOCK;
            WT *out = y + i * ldy + j;
            if (vectors == NV)
                WSUF(winograd_block)(weight_rows, v + j, ldv, K, out, ldy, NV);
            else if (vectors == 2)
                WSUF(winograd_block)(weight_rows, v + j, ldv, K, out, ldy, 2);
            else
                WSUF(winograd_block)(weight_rows, v + j, ldv, K, out, ldy, 1);
        }
        j += vectors * WLANES;
    }
}
