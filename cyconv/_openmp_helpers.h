/* Whether the kernels were compiled with OpenMP (without it, Cython's prange is
 * a plain loop and the kernels run serially). */
#ifndef CYCONV_OPENMP_HELPERS_H
#define CYCONV_OPENMP_HELPERS_H
#ifdef _OPENMP
#define CYCONV_OPENMP 1
#else
#define CYCONV_OPENMP 0
#endif
#endif
