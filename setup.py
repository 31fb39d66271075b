"""Build fastssl and its C++ extension ``fastssl._C``.

* CPU kernels (``csrc/cpu/*.cpp``) are built whenever torch is importable.
* CUDA C++ kernels (``csrc/cuda/*.cu``: EMA, MoCo queue) are added where torch is a CUDA build
  *and* a CUDA toolkit is found (``CUDA_HOME`` / nvcc). No GPU is needed at build time: they
  are compiled for ``TORCH_CUDA_ARCH_LIST``, default ``8.0;9.0+PTX`` (sm_80 and sm_90 code,
  plus compute_90 PTX that newer GPUs JIT-compile). Override, e.g.
  ``TORCH_CUDA_ARCH_LIST="8.6;8.9" pip install --no-build-isolation .``
* ``FASTSSL_NO_EXT=1`` builds no C++ at all (no compiler needed): the package then runs its
  Triton kernels on CUDA tensors and the pure-PyTorch reference on CPU tensors;
  ``fastssl info`` says what is missing and why.
* ``FASTSSL_NO_CUDA=1`` skips only the CUDA sources.

Builds use ninja with ``MAX_JOBS`` parallel jobs (default: every core) and keep their objects
in ``build/temp-<python>-torch<version>/``, also for editable installs, so a rebuild after a
change recompiles only the translation units that changed.

Install torch first and build without isolation, so pip does not pull another torch::

    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# The architectures a CUDA build targets when the user does not say (no GPU is visible at
# build time on CI or in a container build, and torch would otherwise fail to pick one).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _persistent_build_temp(torch_version: str, with_cuda: bool) -> str:
    # setuptools' editable installs compile into a fresh temporary directory each time, which
    # makes every `pip install -e .` a full rebuild. One directory per (python, torch, cuda)
    # keeps ninja's objects and dependency log between runs; ninja itself rebuilds an object
    # when its source, a header it includes, or its command line changed.
    tag = (f"temp-{platform.machine()}-py{sys.version_info[0]}{sys.version_info[1]}"
           f"-torch{torch_version}" + ("-cuda" if with_cuda else ""))
    return os.path.join(HERE, "build", tag)


def _set_cuda_home() -> None:
    """torch takes the CUDA toolkit from $CUDA_HOME, else from the directory above `which nvcc`.
    Where nvcc on PATH is a wrapper script (here /usr/local/bin/nvcc execs
    /usr/local/cuda-13.0/bin/nvcc) that directory, /usr/local, has no CUDA headers or
    libraries; pick a directory that has them, so the build does not fail half-way."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if (os.path.isfile(os.path.join(home, "bin", "nvcc"))
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))):
            os.environ["CUDA_HOME"] = home
            return


def extension_modules():
    if _flag("FASTSSL_NO_EXT"):
        print("fastssl: FASTSSL_NO_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            "fastssl's C++ extension builds against the installed torch, which was not found. "
            "Install torch first (pip install torch==2.13.0), then build without isolation: "
            "pip install --no-build-isolation -e .   (or set FASTSSL_NO_EXT=1 to skip the "
            "extension)") from exc
    if torch.version.cuda is not None and not _flag("FASTSSL_NO_CUDA"):
        _set_cuda_home()  # before cpp_extension reads it, at import
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastssl.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Portable flags only: no -march=native. The hot loops carry
    # target_clones(x86-64-v4, x86-64-v3, default) so AVX-512 / AVX2+FMA are picked at run
    # time on x86-64; other architectures build the plain version.
    # -ffp-contract=off: the augmentation kernels must match the reference bit for bit-ish
    # (docs/DESIGN.md, section 4.8). -fno-trapping-math changes no result (no FP
    # exception flag is inspected) but lets GCC if-convert, hence vectorise, loops with
    # selects (hue).
    # -g0: Python's own CFLAGS carry -g; debug info for these template-heavy files costs build
    # time and tens of MB, and no one steps through them in a debugger from a pip install.
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math",
           "-Wno-unused-parameter"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-DFASTSSL_X86=1")
    link = ["-fopenmp"]
    define_macros = []
    with_cuda = False
    if torch.version.cuda is not None and not _flag("FASTSSL_NO_CUDA"):
        if CUDA_HOME is None:
            print("fastssl: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME "
                  "or put nvcc on PATH); building the CPU kernels only", file=sys.stderr)
        else:
            with_cuda = True
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"fastssl: building the CUDA kernels with {os.path.join(CUDA_HOME, 'bin', 'nvcc')}"
              f" for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTSSL_WITH_CUDA", "1"))
        # C++20: ATen's headers (torch >= 2.10) refuse older standards, in nvcc's host pass too.
        ext = CUDAExtension(
            "fastssl._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link)
    else:
        ext = CppExtension("fastssl._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)

    build_temp = _persistent_build_temp(torch.__version__, with_cuda)

    class BuildExt(BuildExtension):
        """torch's BuildExtension with ninja and a build directory that outlives the install."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp

    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(os.cpu_count() or 1)
    return [ext], {"build_ext": BuildExt}


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
    entry_points={"console_scripts": ["fastssl=fastssl.tools.cli:main"]},
)
