cdef extern from "_openmp_helpers.h":
    int CYCONV_OPENMP
