/* OpenMP shim: lets the kernels compile serially when the compiler has no
 * OpenMP (Cython's prange then becomes a plain loop). */
#ifndef CYCONV_OPENMP_HELPERS_H
#define CYCONV_OPENMP_HELPERS_H
#ifdef _OPENMP
#include <omp.h>
#define CYCONV_OPENMP 1
#else
#define CYCONV_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_procs(void) { return 1; }
#endif
#endif
