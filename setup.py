"""Builds the native CPU attention and int8 matmul kernels (XLA FFI extensions) on x86-64;
elsewhere, or if the compiler fails, the package installs without them and the selectors fall
back to XLA kernels."""

import importlib.util
import pathlib
import platform

from setuptools import Extension, setup


def native_extensions():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    jaxlib = importlib.util.find_spec("jaxlib")
    include = [str(pathlib.Path(jaxlib.origin).parent / "include")] if jaxlib else []
    flags = ["-std=gnu++17", "-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi",
             "-fvisibility=hidden"]
    return [Extension(
        "transformax._flash_cpu",
        sources=["csrc/flash_attention.cc"],
        depends=["csrc/flash_kernel.h", "csrc/parallel.h"],
        include_dirs=include,
        language="c++",
        extra_compile_args=flags,
        optional=True,
    ), Extension("transformax._int8_cpu", sources=["csrc/int8_matmul.cc"],
                 depends=["csrc/int8_kernel.h", "csrc/parallel.h"], include_dirs=include,
                 language="c++", extra_compile_args=flags, optional=True)]


setup(ext_modules=native_extensions())
