/* The activations that the convolution kernels apply after the bias, by the codes
 * of _elementwise.pxd's Activation: 0 none, 1 max(v, 0), 2 min(max(v, 0), 6),
 * keeping NaN.  One scalar form, and one that defines the form for a vector type. */
#ifndef CYCONV_ACTIVATE_H
#define CYCONV_ACTIVATE_H

#define CYCONV_ACTIVATE(v, act) \
    ((act) == 0 ? (v) : (v) <= 0 ? 0 : ((act) == 2 && (v) >= 6) ? 6 : (v))

/* VEC NAME(VEC v, int act): CYCONV_ACTIVATE lane by lane for a GCC vector type VEC
 * whose integer mask type is MASK: clear the lanes that are <= 0, then (code 2) set
 * those that are >= 6. */
#define CYCONV_VECTOR_ACTIVATE(NAME, VEC, MASK)                                              \
    static inline __attribute__((always_inline)) VEC NAME(VEC v, int act)                    \
    {                                                                                        \
        if (act)                                                                             \
            v = (VEC)((MASK)v & ~(MASK)(v <= 0));                                            \
        if (act == 2) {                                                                      \
            MASK high = (MASK)(v >= 6);                                                      \
            v = (VEC)(((MASK)v & ~high) | ((MASK)((VEC){0} + 6) & high));                    \
        }                                                                                    \
        return v;                                                                            \
    }

#endif
