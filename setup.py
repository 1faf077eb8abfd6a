"""Build script for cyconv's Cython kernels.

Compiler directives are set here, once, for every extension:
language_level 3, wraparound off, cdivision on, initializedcheck off;
bounds checking is off unless the environment variable CYCONV_DEBUG=1 asks for
a debug build (then boundscheck and initializedcheck are on, -O0 -g).

OpenMP flags are chosen per compiler; when the compiler cannot build an
OpenMP program the kernels are compiled serially (prange becomes range).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CYCONV_DEBUG", "0") not in ("", "0")

# One module per layer family; each has a .pxd declaring its kernels.
MODULES = ["_parallel", "_conv", "_conv_direct", "_depthwise", "_pool", "_activation", "_linear",
           "_norm", "_dropout", "_loss", "_optim"]

DIRECTIVES = {
    "language_level": 3,
    "wraparound": False,
    "cdivision": True,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
}


def _openmp_flags(compiler_type):
    """(compile flags, link flags) that enable OpenMP for this compiler."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang needs libomp installed
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _compiles_with_openmp(compiler, compile_flags, link_flags):
    """True when a tiny OpenMP program compiles and links with these flags."""
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as f:
            f.write(source)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=compile_flags)
            compiler.link_executable(objects, "check_openmp", output_dir=tmp,
                                     extra_postargs=link_flags)
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """build_ext that adds optimisation and (when available) OpenMP flags."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            opt = ["/Od", "/Zi"] if DEBUG else ["/O2"]
        else:
            opt = ["-O0", "-g"] if DEBUG else ["-O3"]
            # No kernel relies on floating-point traps; without this flag the
            # compiler keeps selects over floats (max-pool, ReLU masks) as
            # branches instead of vector blends.  Results are unchanged.
            opt += ["-fno-trapping-math"]
            opt += ["-Wno-unused-function", "-Wno-unreachable-code"]
        omp_compile, omp_link = _openmp_flags(ctype)
        with_openmp = os.environ.get("CYCONV_NO_OPENMP", "0") in ("", "0") and \
            _compiles_with_openmp(self.compiler, omp_compile, omp_link)
        if not with_openmp:
            print("cyconv: OpenMP not available; building serial kernels", file=sys.stderr)
            omp_compile, omp_link = [], []
        for ext in self.extensions:
            ext.extra_compile_args = opt + omp_compile
            ext.extra_link_args = omp_link
        super().build_extensions()


extensions = [
    Extension(f"cyconv.{name}", [f"cyconv/{name}.pyx"],
              include_dirs=[np.get_include(), "cyconv"],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    for name in MODULES
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                          include_path=["cyconv"]),
    cmdclass={"build_ext": BuildExt},
)
