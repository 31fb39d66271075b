"""Build fastssl and its C++ extension ``fastssl._C``.

* CPU kernels (``csrc/cpu/*.cpp``) are always built when torch is importable.
* CUDA C++ kernels (``csrc/cuda/*.cu``) are added only where torch was built with CUDA
  *and* a CUDA toolkit is found (``CUDA_HOME``).
* ``FASTSSL_NO_EXT=1`` skips the extension entirely (the package then runs on the
  reference / Triton backends and ``fastssl info`` says why the C++ kernels are missing).
* ``FASTSSL_NO_CUDA=1`` skips only the CUDA sources.

Install torch first and build without isolation, so pip does not pull another torch::

    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import glob
import os
import platform

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension_modules():
    if _flag("FASTSSL_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            "fastssl's C++ extension builds against the installed torch, which was not found. "
            "Install torch first (pip install torch==2.13.0), then build without isolation: "
            "pip install --no-build-isolation -e .   (or set FASTSSL_NO_EXT=1 to skip the "
            "extension)") from exc
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastssl.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Portable flags only: no -march=native. The hot loops carry
    # target_clones(x86-64-v4, x86-64-v3, default) so AVX-512 / AVX2+FMA are picked at run
    # time on x86-64; other architectures build the plain version.
    # -ffp-contract=off: the augmentation kernels must match the reference bit for bit-ish
    # (docs/DESIGN.md, section 4.8). -fno-trapping-math changes no result (no FP exception
    # flag is inspected) but lets GCC if-convert, hence vectorise, loops with selects (hue).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math",
           "-Wno-unused-parameter"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-DFASTSSL_X86=1")
    link = ["-fopenmp"]
    define_macros = []
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and not _flag("FASTSSL_NO_CUDA"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTSSL_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "fastssl._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link)
    else:
        ext = CppExtension("fastssl._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastssl",
    version="0.1.0",
    description="Fused kernels for large-batch self-supervised contrastive training in PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastssl", "fastssl.*"]),
    package_data={"fastssl": ["data/*"]},
    python_requires=">=3.9",
    # torch is deliberately not pinned here: install it first (README), so that pip never
    # replaces the CPU wheel with a multi-GB CUDA build.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib", "triton"],
        "bench": ["pytest-benchmark", "matplotlib", "triton"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastssl=fastssl.cli:main"]},
)
