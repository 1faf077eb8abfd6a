/* One name for the float and the double version of a C kernel.
 *
 * The kernels written in C exist as name_float and name_double.  CYCONV_TYPED
 * picks one by the type of the first (pointer) argument, at compile time (C11
 * _Generic), so that a Cython kernel over fused types calls a single name,
 * declared there as `void name(...)`.
 */
#ifndef CYCONV_TYPED_H
#define CYCONV_TYPED_H

#define CYCONV_TYPED(name, first, ...)                                             \
    _Generic((first), float *: name##_float, const float *: name##_float,          \
             double *: name##_double, const double *: name##_double)(first, __VA_ARGS__)

#endif
