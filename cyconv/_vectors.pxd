# The vector width of the kernels that keep register blocks (_multiversion.h): picked
# by the CPU, or forced by the tests to check that both widths give the same bits.
cdef extern from "_multiversion.h":
    int cyconv_vector_choice


cdef inline void set_vector_width(width, str module) except *:
    """This module's kernels run with vectors of width bytes (32 or 64), or as the
    CPU suits (None)."""
    global cyconv_vector_choice
    choices = {None: -1, 32: 0, 64: 1}
    if width not in choices:
        raise ValueError(f"{module}.force_vector_width: expected None, 32 or 64, got {width!r}")
    cyconv_vector_choice = choices[width]
