cdef extern from "_openmp_helpers.h":
    int CYCONV_OPENMP
    int omp_get_max_threads() nogil
