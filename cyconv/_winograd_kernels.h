/* Winograd F(4x4, 3x3) kernels for one element type; see _winograd.h, which
 * includes this file with WT = float and WT = double (WSUF names each copy):
 * the vector type and the one-dimensional transforms here, then the transforms
 * of tiles (_winograd_tiles.h) and those of filters with the products
 * (_winograd_filters.h). */

#if defined(__GNUC__)
typedef WT WSUF(wvec) __attribute__((vector_size(WINOGRAD_VECTOR_BYTES), aligned(sizeof(WT))));
typedef WMASK WSUF(wmask) __attribute__((vector_size(WINOGRAD_VECTOR_BYTES)));
#define WLANES ((int)(WINOGRAD_VECTOR_BYTES / sizeof(WT)))

/* the activation of code act (_activate.h) */
CYCONV_VECTOR_ACTIVATE(WSUF(wactivate), WSUF(wvec), WSUF(wmask))
#else
typedef WT WSUF(wvec); /* other compilers: one lane */
#define WLANES 1

CYCONV_ALWAYS_INLINE WT WSUF(wactivate)(WT v, int act)
{
    return CYCONV_ACTIVATE(v, act);
}
#endif

CYCONV_ALWAYS_INLINE WSUF(wvec) WSUF(wload)(const WT *p)
{
    return *(const WSUF(wvec) *)p;
}

/* p[l] = v[l] for l < n (all lanes when n >= WLANES) */
CYCONV_ALWAYS_INLINE void WSUF(wstore)(WT *p, WSUF(wvec) v, int n)
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_bt)(const WSUF(wvec) d[6], WSUF(wvec) r[6])
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
CYCONV_ALWAYS_INLINE void WSUF(winograd_at)(const WSUF(wvec) m[6], WSUF(wvec) o[4])
{
    WSUF(wvec) sum12 = m[1] + m[2], diff12 = m[1] - m[2];
    WSUF(wvec) sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    o[0] = m[0] + sum12 + sum34;
    o[1] = diff12 + (WT)2 * diff34;
    o[2] = sum12 + (WT)4 * sum34;
    o[3] = diff12 + (WT)8 * diff34 + m[5];
}

/* e = A y (y: a column or row of the 4x4 output gradient of one tile) */
CYCONV_ALWAYS_INLINE void WSUF(winograd_a)(const WSUF(wvec) y[4], WSUF(wvec) e[6])
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

#include "_winograd_tiles.h"
#include "_winograd_filters.h"

#undef WLANES
