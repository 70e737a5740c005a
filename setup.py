"""Build script: the pure-Python package plus optional native ops from csrc/.

Environment switches:
  RTMDET_NO_NATIVE=1   skip every native build (pure Python + Triton only)
  RTMDET_NO_CUDA=1     build the C++ CPU ops but not the CUDA sources
  TORCH_CUDA_ARCH_LIST GPU architectures of the CUDA part; unset with no GPU visible (a build
                       box with the CUDA toolkit), DEFAULT_CUDA_ARCHS is used
The Triton kernels live in kernels/ and install as the subpackage rtmdet.kernels,
so no top-level module named `kernels` (a PyPI package) is ever installed.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_installed_torch():
    """Make the target environment's torch importable inside pip's isolated build env.

    A plain `pip install -e .` builds in an isolated environment without the user's torch;
    the extension must be compiled against the torch it will run with, so ask the same
    interpreter, without the isolation's PYTHONPATH, where its torch lives and append that.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        found = subprocess.run(
            [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    if found and found not in sys.path:
        sys.path.append(found)
    return bool(found)


# Built when no GPU is visible to choose from: Turing to Hopper (CUDA 13 dropped everything
# older), plus PTX of the newest so that later GPUs can JIT-compile it.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def default_cuda_arch_list(environ, visible_gpus):
    """The TORCH_CUDA_ARCH_LIST to set before a CUDA build, or None to keep torch's choice.

    Unset (or "native"), torch builds for the visible GPUs, and with none it fails with
    `IndexError: list index out of range`; a build box without a GPU gets the default then.
    """
    requested = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if visible_gpus > 0 or requested not in ("", "native"):
        return None
    return DEFAULT_CUDA_ARCHS


def native_extensions():
    if _flag("RTMDET_NO_NATIVE"):
        print("rtmdet: RTMDET_NO_NATIVE set, building no native ops")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        if not _find_installed_torch():
            print("rtmdet: torch is not importable at build time, building no native ops "
                  "(install torch first)")
            return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        print(f"rtmdet: cannot import torch at build time ({exc}), building no native ops")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"] if os.name != "nt" else ["/O2"]
    extra = {"cxx": cxx}
    macros = []
    ext_cls = cpp_extension.CppExtension
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = cuda_sources and not _flag("RTMDET_NO_CUDA")
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources += cuda_sources
        ext_cls = cpp_extension.CUDAExtension
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        macros.append(("RTMDET_WITH_CUDA", None))
        archs = default_cuda_arch_list(os.environ, torch.cuda.device_count())
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            print(f"rtmdet: no GPU visible, TORCH_CUDA_ARCH_LIST unset: building for {archs} "
                  "(set TORCH_CUDA_ARCH_LIST to choose, or RTMDET_NO_CUDA=1 to skip CUDA)")
        print(f"rtmdet: building C++ CPU ops and {len(cuda_sources)} CUDA sources "
              f"(CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
    else:
        why = ("RTMDET_NO_CUDA set" if _flag("RTMDET_NO_CUDA") else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"rtmdet: building C++ CPU ops only ({why})")
    ext = ext_cls("rtmdet._C", sources, include_dirs=[os.path.abspath("csrc")],
                  define_macros=macros, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"] if os.name != "nt" else [])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="rtmdet-fast",
    version="0.1.0",
    description="Fast, faithful RTMDet training machinery: fused DSLA assigner, losses, model, trainer",
    python_requires=">=3.10",
    packages=["rtmdet", "rtmdet.ops", "rtmdet.data", "rtmdet.integrations", "rtmdet.training",
              "rtmdet.kernels"],
    package_dir={"rtmdet": "rtmdet", "rtmdet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "hypothesis"],
        "train": ["pycocotools", "pillow", "matplotlib"],
        "triton": ["triton==3.6.0"],
    },
    entry_points={"console_scripts": ["rtmdet=rtmdet.cli:main"]},
)
