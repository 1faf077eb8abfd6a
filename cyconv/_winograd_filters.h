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
/* Rows (output channels) and tiles of a register block of the forward product:
 * 2 vectors of tiles by 8 rows (16 accumulators) with 64-byte vectors, by 4
 * rows (8) with 32-byte ones; either way a part of a row block of the packed
 * weight. */
enum {
    WSUF(BLOCK_ROWS) = WINOGRAD_VECTOR_BYTES == 64 ? WINOGRAD_CHANNEL_BLOCK
                                                   : WINOGRAD_CHANNEL_BLOCK / 2,
    WSUF(BLOCK_TILES) = 2 * WLANES
};

/* c[i * ldc + j] = sum_k a[k * CHANNEL_BLOCK + i] * b[k * ldb + j] for
 * i < BLOCK_ROWS, j < BLOCK_TILES: one register block of the forward product
 * (outer products, two vectors of tiles per row). */
CYCONV_ALWAYS_INLINE void WSUF(winograd_block)(
    const WT *a, const WT *b, ptrdiff_t ldb, int K, WT *c, ptrdiff_t ldc)
{
    enum { MR = WSUF(BLOCK_ROWS) };
    WSUF(wvec) acc[MR][2];
    for (int i = 0; i < MR; i++)
        acc[i][0] = acc[i][1] = (WSUF(wvec)){0};
    for (int k = 0; k < K; k++) {
        WSUF(wvec) x0 = WSUF(wload)(b + k * ldb), x1 = WSUF(wload)(b + k * ldb + WLANES);
        for (int i = 0; i < MR; i++) {
            acc[i][0] += a[k * WINOGRAD_CHANNEL_BLOCK + i] * x0;
            acc[i][1] += a[k * WINOGRAD_CHANNEL_BLOCK + i] * x1;
        }
    }
    for (int i = 0; i < MR; i++) {
        *(WSUF(wvec) *)(c + i * ldc) = acc[i][0];
        *(WSUF(wvec) *)(c + i * ldc + WLANES) = acc[i][1];
    }
}

#else
/* Other compilers: the same blocks as plain loops. */
enum { WSUF(BLOCK_ROWS) = WINOGRAD_CHANNEL_BLOCK, WSUF(BLOCK_TILES) = WINOGRAD_TILE_BLOCK };

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
CYCONV_MULTIVERSION
static void WSUF(winograd_product)(const WT *u, const WT *v, ptrdiff_t ldv, int M, int K,
                                   ptrdiff_t T, WT *y, ptrdiff_t ldy)
{
    for (ptrdiff_t j = 0; j < T; j += WSUF(BLOCK_TILES))
        for (int i = 0; i < M; i += WSUF(BLOCK_ROWS)) {
            const WT *weight_rows = u + (ptrdiff_t)(i / WINOGRAD_CHANNEL_BLOCK) * K *
                                            WINOGRAD_CHANNEL_BLOCK + i % WINOGRAD_CHANNEL_BLOCK;
            WSUF(winograd_block)(weight_rows, v + j, ldv, K, y + i * ldy + j, ldy);
        }
}
