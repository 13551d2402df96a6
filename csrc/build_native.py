"""cffi builder for pyvbak._native (out-of-line API mode).

setup.py refers to ``csrc/build_native.py:ffibuilder``; ``python csrc/build_native.py``
also builds it in place for quick iteration.  Needs only a C compiler and Python headers:
the SIMD kernels select their instruction set per function (``__attribute__((target))``),
so no -m flags are passed and the module runs on any x86-64 (or other) CPU; the kernel is
chosen at run time.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["hash_scalar.c", "hash_avx2.c", "hash_avx512.c", "hash_common.c", "scan.c", "diff.c", "sha256.c", "sha256_x16.c", "gather.c", "decode.c"]

ffibuilder = FFI()
with open(os.path.join(HERE, "native_cdef.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "pyvbak._native",
    '#include "pyvbak_native.h"',
    # setuptools wants paths relative to setup.py's directory (the project root).
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    libraries=["dl"],  # decode.c dlopens libzstd (glibc < 2.34 keeps dlopen in libdl)
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
