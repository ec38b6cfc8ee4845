"""Build of npr._C: CPU sources always, CUDA sources when a CUDA toolkit and a CUDA torch exist.

Environment: NPR_FORCE_CUDA=1 builds the CUDA sources even without a visible GPU (compile check),
NPR_NO_CUDA=1 never builds them. MAX_JOBS bounds ninja's parallelism.

The build needs torch at build time: plain `pip install -e .` gets the pinned torch of
[build-system] requires in an isolated build environment; with --no-build-isolation the torch of
the current environment is used.
"""
import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # only reachable with --no-build-isolation and no torch installed
    raise SystemExit(
        f"npr's build needs torch ({e}): run `pip install torch==2.13.0` first, or drop "
        "--no-build-isolation so pip installs the pinned torch for the build"
    ) from None


def _cpu_flags() -> list[str]:
    """x86-64 builds target AVX2 + FMA + F16C (the AVX-512 variants are chosen at run time);
    other machines build the portable kernels with the compiler's defaults."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _want_cuda() -> bool:
    if os.environ.get("NPR_NO_CUDA") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    has_toolkit = CUDA_HOME is not None
    has_cuda_torch = torch.version.cuda is not None
    if os.environ.get("NPR_FORCE_CUDA") == "1":
        if not (has_toolkit and has_cuda_torch):
            raise RuntimeError(
                f"NPR_FORCE_CUDA=1 but CUDA_HOME={CUDA_HOME!r}, torch.version.cuda="
                f"{torch.version.cuda!r}: need a CUDA toolkit and a CUDA build of torch"
            )
        return True
    return has_toolkit and has_cuda_torch


def _ext_modules():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", *_cpu_flags()]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "npr", "kernels")]
    if _want_cuda():
        cuda_sources = rel(glob.glob(os.path.join(ROOT, "npr", "kernels", "*.cu")))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "npr._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("NPR_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "npr._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["npr", "npr.*"]),
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
)
