"""Build script for cyconv's Cython kernels.

Compiler directives are set here, once, for every extension: language_level 3,
wraparound off, cdivision on, and bounds, initialisation and None checks off
unless a debug build is asked for.  Builds, chosen by environment variables:

    (default)                  -O3, OpenMP when the compiler has it
    CYCONV_DEBUG=1             bounds-checked memoryviews, -O0 -g
    CYCONV_SANITIZE=address,undefined
                               AddressSanitizer / UBSan (-O0 -g); run Python with
                               LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
    CYCONV_NO_OPENMP=1         serial kernels (prange becomes range), as a compiler
                               without OpenMP would build them

The kernels are compiled once per change of their sources (.pyx, .pxd, .h, this
script), of these settings or of the Cython and numpy they are built with: a later
install (``pip install -e ".[test]"`` after ``pip install -e .``) reuses the
extensions already built in place, as a make rule would, even when pip's isolated
build environment (numpy installed afresh) has made Cython write the C files again.
"""
import json
import os
import shutil
import sys
import tempfile

import Cython
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CYCONV_DEBUG", "0") not in ("", "0")
SANITIZE = os.environ.get("CYCONV_SANITIZE", "")
NO_OPENMP = os.environ.get("CYCONV_NO_OPENMP", "0") not in ("", "0")

# One module per layer family (plus _parallel, which reports whether OpenMP is on).
MODULES = ["_parallel", "_conv", "_conv_direct", "_depthwise", "_winograd", "_pool",
           "_activation", "_linear", "_norm", "_norm_pool", "_dropout", "_loss", "_optim"]

DIRECTIVES = {
    "language_level": 3,
    "wraparound": False,
    "cdivision": True,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
}
HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "cyconv", "_build_info.json")


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


def _optimisation_flags(compiler_type):
    if compiler_type == "msvc":
        return ["/Od", "/Zi"] if DEBUG else ["/O2"], []
    if SANITIZE:
        sanitize = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=all"]
        # -O0: every memory access instrumented as written, and a quarter of -O1's
        # compile time (the tests under it run 1.4x longer)
        return ["-O0", "-g"] + sanitize, sanitize
    # No kernel relies on floating-point traps; without -fno-trapping-math the compiler
    # keeps selects over floats (max-pool, ReLU masks) as branches instead of vector
    # blends.  Results are unchanged.  -g0 overrides Python's -g: debug information
    # took a quarter of the optimised build's time.
    flags = (["-O0", "-g"] if DEBUG else ["-O3", "-g0"]) + ["-fno-trapping-math"]
    return flags + ["-Wno-unused-function", "-Wno-unreachable-code"], []


class BuildExt(build_ext):
    """build_ext with optimisation and (when available) OpenMP flags, compiling in
    parallel and reusing up-to-date extensions built in place with the same settings."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        compile_flags, link_flags = _optimisation_flags(ctype)
        omp_compile, omp_link = _openmp_flags(ctype)
        with_openmp = not NO_OPENMP and _compiles_with_openmp(self.compiler, omp_compile,
                                                              omp_link)
        if not with_openmp:
            print("cyconv: building serial kernels (no OpenMP)", file=sys.stderr)
            omp_compile, omp_link = [], []
        for ext in self.extensions:
            ext.extra_compile_args = compile_flags + omp_compile
            ext.extra_link_args = link_flags + omp_link
        self.settings = {"debug": DEBUG, "sanitize": SANITIZE, "openmp": with_openmp,
                         "flags": compile_flags + omp_compile, "cython": Cython.__version__,
                         "numpy": np.__version__}
        self.previous = _read_build_info()
        if os.path.exists(BUILD_INFO):   # an interrupted build must not look finished
            os.remove(BUILD_INFO)
        print("cyconv: compiling the kernels (2-3 minutes on 2 cores)", file=sys.stderr)
        super().build_extensions()
        with open(BUILD_INFO, "w") as f:
            json.dump(self.settings, f)

    def build_extension(self, ext):
        built = os.path.join(HERE, *ext.name.split(".")[:-1], self.get_ext_filename(
            ext.name.split(".")[-1]))
        target = self.get_ext_fullpath(ext.name)
        if self._up_to_date(built, ext):
            if os.path.abspath(built) != os.path.abspath(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(built, target)
            print(f"cyconv: {ext.name} is up to date", file=sys.stderr)
            return
        if os.path.exists(target):   # else setuptools keeps a target newer than its C file,
            os.remove(target)        # though built with other settings
        super().build_extension(ext)

    def _up_to_date(self, built, ext):
        """True when ``built`` exists, is newer than every source it may depend on, and was
        compiled with the same settings."""
        try:
            newest = max(os.path.getmtime(p) for p in _kernel_sources(ext))
            return (self.previous == self.settings and not self.force
                    and os.path.getmtime(built) > newest)
        except (OSError, ValueError):
            return False


def _read_build_info():
    try:
        with open(BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _kernel_sources(ext):
    """The extension's .pyx, every .pxd / .h of the package and this script: not the
    generated C file, which Cython rewrites whenever numpy's .pxd files are newer (a fresh
    build environment), the same C for the same Cython and numpy (both in the settings)."""
    folder = os.path.join(HERE, "cyconv")
    shared = [os.path.join(folder, name) for name in os.listdir(folder)
              if name.endswith((".pxd", ".h"))]
    pyx = os.path.join(folder, ext.name.split(".")[-1] + ".pyx")
    return [pyx, os.path.abspath(__file__)] + shared


extensions = [
    Extension(f"cyconv.{name}", [f"cyconv/{name}.pyx"],
              include_dirs=[np.get_include(), "cyconv"],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    for name in MODULES
]

setup(
    # the C files of a debug build (other directives) are kept apart from the others'
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, include_path=["cyconv"],
                          build_dir="build/cython-debug" if DEBUG else "build/cython",
                          quiet=True),
    cmdclass={"build_ext": BuildExt},
)
