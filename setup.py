"""Builds the native core; the compiled extensions are required (no pure-Python fallback)."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

SANITIZE = os.environ.get("KVMIRQFAST_SANITIZE")  # e.g. "address,undefined" for ASan/UBSan
cflags = ["-O2", "-Wno-unused-function"]
ldflags = []
if SANITIZE:
    cflags += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g", "-O1"]
    ldflags += [f"-fsanitize={SANITIZE}"]


def ext(name):
    return Extension(f"kvmirqfast.{name}", [f"kvmirqfast/{name}.pyx"],
                     include_dirs=["kvmirqfast/include"],
                     extra_compile_args=cflags, extra_link_args=ldflags)


setup(ext_modules=cythonize([ext("_lapic"), ext("_engine"), ext("_index")],
                            compiler_directives={"language_level": "3"}))
