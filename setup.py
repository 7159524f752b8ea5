"""Build embedding_ext: the C++ kernels always, the CUDA kernels whenever torch is a CUDA
build and nvcc is found (a visible GPU is not needed).

Build with --no-build-isolation, against the torch that will import the binary
(docs/install.md); the package then requires exactly that torch.

Environment switches (all optional):
  EMBEDDING_EXT_FORCE_CPU=1      build the C++ kernels only (embedding_ext._C), even where
                                 CUDA could be built (embedding_ext._C_cuda)
  TORCH_CUDA_ARCH_LIST="9.0"     the CUDA architectures; default "8.0;9.0+PTX" with no GPU
                                 visible (A100, H100/H200, PTX for newer cards)
  CUDA_HOME=/path                the CUDA toolkit; default: the one holding `nvcc` on PATH,
                                 else /usr/local/cuda
  MAX_JOBS=N                     parallel compile jobs (ninja)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _find_cuda_home():
    """torch's own guess can land on /usr/local (where a wrapper `nvcc` script may live);
    take the first candidate that is a real toolkit: bin/nvcc plus the runtime headers."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads it once.
    os.environ["CUDA_HOME"] = _cuda_home

try:
    import torch  # noqa: E402
except ImportError:
    # Under pip's default build isolation the build runs in a fresh environment without the
    # user's torch; compiling against another torch would give a binary their torch refuses.
    sys.exit(
        "embedding_ext: building needs the torch that will import it, and this build "
        "environment has none: pip's build isolation hides your installed packages. Install "
        "torch first, then build with `pip install --no-build-isolation .` (or `make wheel`); "
        "see docs/install.md.")
import importlib.metadata  # noqa: E402

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _want_cuda():
    if os.environ.get("EMBEDDING_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _cuda_home is not None and (
        Path(_cuda_home) / "bin" / "nvcc").exists()


def _extensions():
    """embedding_ext._C (the schemas, the CPU kernels, autograd, build facts) always; and
    embedding_ext._C_cuda (the CUDA kernels and their runtime controls) where CUDA can be
    built. Two binaries so that a CPU-only build (EMBEDDING_EXT_FORCE_CPU=1, the benchmark's
    main job on a machine without a GPU) compiles _C with the same commands as a full build:
    a later full build then compiles only the CUDA files."""
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cpu").glob("*.cpp"))]
    openmp = torch.backends.openmp.is_available()
    # Only the method operators: each file includes ATen/core/Tensor.h and the ATen/ops/
    # headers of the functions it calls, never ATen/ATen.h (every op's declaration: it made
    # up 40% of a file's compile); the macro makes an include of all operators an error.
    macros = [("EMBEDDING_EXT_TORCH_VERSION", f'"{torch.__version__}"'),
              ("TORCH_ASSERT_ONLY_METHOD_OPERATORS", None)]
    # -ffp-contract=off: the AVX2 / AVX-512 copies of the bag pooling and fused update loops
    # (csrc/cpu/isa.h) give the same bits as their baseline x86-64 copies (no a*b+c fused
    # into one rounding, whatever the target allows).
    # -fno-math-errno: sqrt may then be a vector instruction (nothing here reads errno; the
    # results are the same correctly rounded values). Without it GCC kept the fused
    # Adagrad/SparseAdam rules scalar (sqrtss + divss per element; bench/notes/cpu-fused.md 10.2).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])
    link = (["-fopenmp"] if openmp else []) + _SHARED_LIBSTDCXX
    extensions = [CppExtension("embedding_ext._C", sources, define_macros=macros,
                               extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    if not _want_cuda():
        return extensions
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")
    cuda_sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    cuda_sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cpp"))]
    cuda_macros = macros + [("EMBEDDING_EXT_CUDA_ARCH_LIST", f'"{arch_list}"')]
    extensions.append(CUDAExtension(
        "embedding_ext._C_cuda", cuda_sources, define_macros=cuda_macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link))
    return extensions


class BuildChecked(BuildExtension):
    """Refuses a binary that carries its own copy of libstdc++'s stream code: there, every
    error message with a number in it (c10::str) comes out cut short or crashes the process
    (seen on a GPU machine whose /opt/gcc toolchain linked libstdc++ statically: a SIGSEGV in
    std::ostream::_M_insert<long> on the first out-of-range index)."""

    def finalize_options(self):
        super().finalize_options()
        # Always compile: without ninja, setuptools' up-to-date check could package a binary
        # that an earlier build made against another torch.
        self.force = True
        # make wheel: the in-place build's folder of this venv, so that ninja reuses the
        # objects compiled with the same commands (only what differs, e.g. other CUDA
        # architectures, is compiled again).
        self.build_temp = os.environ.get("EMBEDDING_EXT_BUILD_TEMP") or self.build_temp

    def run(self):
        super().run()
        if not _want_cuda():
            # A CUDA binary left by an earlier full build (in the package folder, or in
            # build/lib, which in-place builds fill too and wheels are packed from) would be
            # loaded next to this _C although it was not rebuilt with it.
            for folder in (ROOT / "embedding_ext", Path(self.build_lib) / "embedding_ext"):
                for stale in folder.glob("_C_cuda.*.so"):
                    stale.unlink()

    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        nm = shutil.which("nm")
        if not sys.platform.startswith("linux") or nm is None:
            return
        defined = subprocess.run([nm, "--defined-only", path], capture_output=True,
                                 text=True).stdout
        if "_ZNSo9_M_insertIlEERSoT_" in defined:  # std::ostream::_M_insert<long>
            raise RuntimeError(
                f"{path} was linked with a static copy of libstdc++ (it defines "
                "std::ostream::_M_insert<long>), which breaks every error message that "
                "formats a number. Link against the shared libstdc++ (drop "
                "-static-libstdc++ from LDFLAGS/CXX, or use a compiler whose lib directory "
                "has libstdc++.so).")


def _loaded_libstdcxx():
    """The shared libstdc++ this process (Python with torch imported) runs on, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


# Link the shared libstdc++ that torch runs on, by path, ahead of whatever the compiler
# driver adds: a toolchain whose own lib directory holds only libstdc++.a (or a driver that
# adds -static-libstdc++) would otherwise put a second, private copy of the C++ runtime into
# the binary. BuildChecked refuses such a binary if it happens anyway.
_SHARED_LIBSTDCXX = ([p for p in [_loaded_libstdcxx()] if p]
                     if "clang" not in os.environ.get("CXX", "") else [])

def _torch_requirement():
    """The exact torch this build is compiled against, as pip knows it: the distribution's
    version (2.13.0+cpu; 2.14.1 for PyPI's CUDA build, whose torch.__version__ reads
    2.14.1+cu130). A version without a local label is pinned with ===, so that pip does not
    take 2.14.1+cpu for it either. [] when the imported torch has no metadata (a source
    tree): the import-time check is then the only guard."""
    try:
        dist_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return []
    if dist_version.split("+")[0] != torch.__version__.split("+")[0]:
        sys.exit(f"embedding_ext: the torch being imported ({torch.__version__}, "
                 f"{torch.__file__}) is not the installed torch distribution "
                 f"({dist_version}); build in an environment with one torch.")
    return [f"torch=={dist_version}" if "+" in dist_version else f"torch==={dist_version}"]


setup(
    ext_modules=_extensions(),
    install_requires=_torch_requirement(),
    cmdclass={"build_ext": BuildChecked},
)
