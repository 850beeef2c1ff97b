"""Build the one C extension, pagewatch._native, from the sources in src/native/."""

from glob import glob

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pagewatch._native",
            sources=sorted(glob("src/native/*.c")),
            include_dirs=["src/native", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    ]
)
