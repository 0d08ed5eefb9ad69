"""Builds smog_kernels._C: the CPU kernels always, the CUDA kernels where nvcc and a CUDA build of
torch are present. SMOG_BUILD_CUDA=1 forces the CUDA part (fails if it cannot build), =0 skips it."""
from __future__ import annotations

import glob
import os
import site
import sys

from setuptools import find_packages, setup

# A wrapper script such as /usr/local/bin/nvcc makes torch guess CUDA_HOME=/usr/local, where the CUDA
# libraries are not; prefer the toolkit folder itself when it exists (before cpp_extension reads it).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda() -> bool:
    switch = os.environ.get("SMOG_BUILD_CUDA", "").strip()
    if switch == "0":
        return False
    present = cpp_extension.CUDA_HOME is not None and cpp_extension.torch.version.cuda is not None
    if switch == "1" and not present:
        sys.exit("SMOG_BUILD_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
    return present and bool(sources("csrc/cuda/*.cu"))


def nvidia_wheel_includes() -> list[str]:
    """CUDA library headers (cusparse.h, ...) that torch's headers include, shipped by nvidia-* wheels."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted(set(found))


CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DSMOG_PYTHON_MODULE"]
cuda = want_cuda()
extension_cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
ext_sources = ["csrc/ops.cpp"] + sources("csrc/cpu/*.cpp")
extra = {"cxx": CXX_FLAGS + (["-DSMOG_WITH_CUDA"] if cuda else [])}
include_dirs = [os.path.join(HERE, "csrc")]
if cuda:
    ext_sources += sources("csrc/cuda/*.cu")
    include_dirs += nvidia_wheel_includes()
    arch = os.environ.get("SMOG_CUDA_ARCH", "-gencode=arch=compute_80,code=sm_80 "
                          "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90")
    extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + arch.split()

setup(
    name="smog",
    version="0.1.0",
    description="Fast, faithful SMoG (Synchronous Momentum Grouping) self-supervised pretraining",
    packages=find_packages(include=["smog", "smog.*", "smog_kernels", "smog_kernels.*"]),
    package_data={"smog": ["configs/*.yaml"]},
    ext_modules=[
        extension_cls(
            name="smog_kernels._C",
            sources=ext_sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "pillow", "pyyaml", "tqdm", "torchvision", "matplotlib"],
    extras_require={"test": ["pytest", "scikit-learn", "tensorboard", "timm"], "triton": ["triton"],
                    "tensorboard": ["tensorboard"], "timm": ["timm"], "wandb": ["wandb"],
                    "bench": ["lightly>=1.6", "scikit-learn"],
                    "examples": ["lightly>=1.6", "lightning"]},
    entry_points={"console_scripts": ["smog=smog.cli:main"]},
)
