"""Build the Cython core (csrc/) as statefun_mesh._speedups_c.

Set STATEFUN_MESH_NO_EXTENSIONS=1 to skip it (the pure-Python twin is used), and
STATEFUN_MESH_CYTHON_TRACE=1 for a line-traced build (profiling, coverage).
A build failure is fatal: opting out is the environment variable's job.
"""

import os
import sys

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("STATEFUN_MESH_NO_EXTENSIONS") and sys.implementation.name == "cpython":
    from Cython.Build import cythonize

    trace = bool(os.environ.get("STATEFUN_MESH_CYTHON_TRACE"))
    directives = {"language_level": 3, "embedsignature": True}
    macros = []
    if trace:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE", "1"))
    ext_modules = cythonize(
        [
            Extension(
                "statefun_mesh._speedups_c",
                ["csrc/_speedups_c.pyx"],
                include_dirs=["csrc"],
                define_macros=macros,
                extra_compile_args=["-O3"],
            )
        ],
        compiler_directives=directives,
    )

setup(ext_modules=ext_modules)
