"""Build of npr._C: CPU sources always, CUDA sources when a CUDA toolkit and a CUDA torch exist.

Environment: NPR_FORCE_CUDA=1 builds the CUDA sources even without a visible GPU (compile check),
NPR_NO_CUDA=1 never builds them. MAX_JOBS bounds ninja's parallelism.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("NPR_NO_CUDA") == "1":
        return False
    import torch
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
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if _want_cuda():
        cuda_sources = rel(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
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
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["npr", "npr.*"]) + ["npr.kernels"],
    package_dir={"npr.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass=_cmdclass(),
)
