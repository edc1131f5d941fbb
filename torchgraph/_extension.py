"""Finds, builds and loads torchgraph's compiled kernels, and records whether that worked.

The kernels are C++ sources that ship with the package (``torchgraph/_csrc`` in an installed
copy, ``csrc/`` in a source checkout). The first import compiles them for this machine's CPU and
the installed torch, with ``torch.utils.cpp_extension.load``, into a per-user cache; later imports
load the cached library in milliseconds. ``torchgraph build-kernels`` does the same ahead of time.

``HAS_C_OPS`` is True once the library is loaded: loading it runs the C++ static initialisers that
register the ``torch.ops.torchgraph.*`` schemas and kernels. When it is False (no compiler, a
failed build, or ``TORCHGRAPH_DISABLE_C_OPS=1``), :mod:`torchgraph.ops` runs its pure-PyTorch
references instead, with the same results and the same error messages.

Design constraints:

* A wheel is pure Python and works with every torch and every CPU: nothing is compiled at install
  time, so no build environment needs torch, pip never downloads one, and no binary built for
  another machine's SIMD level (``-mavx512*``) or another torch's ABI can be loaded.
* The cache key covers everything the binary depends on (torch version and build, Python, CPU
  capability, flags, the sources' contents), so an edited source, a new torch or a home directory
  shared between machines triggers a new build instead of loading a wrong one.
* Concurrent first imports (DDP ranks, pytest workers) build once: the build holds an ``flock``
  (released by the kernel if the process dies) and publishes the library with an atomic rename.
* A failed build is recorded next to its log, so later imports do not pay for it again: they warn
  once per process and use the references. ``torchgraph build-kernels`` retries.
* CUDA kernels are opt-in (``TORCHGRAPH_USE_CUDA=1``): deciding automatically would need
  ``torch.cuda.is_available()`` at import, which initialises the CUDA driver and breaks CUDA in
  forked children.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import warnings

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "CUDA_ENV_VAR",
    "DISABLE_ENV_VAR",
    "HAS_C_OPS",
    "LIBRARY_PATH",
    "LOAD_ERROR",
    "KernelBuild",
    "KernelsUnavailable",
    "build_kernels",
    "kernel_build",
]

DISABLE_ENV_VAR = "TORCHGRAPH_DISABLE_C_OPS"
CACHE_ENV_VAR = "TORCHGRAPH_CACHE_DIR"
CUDA_ENV_VAR = "TORCHGRAPH_USE_CUDA"

_LIBRARY_NAME = "torchgraph_kernels"
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
_FAILED_MARKER = "FAILED"
_RETRY_HINT = "Run `torchgraph build-kernels` to try again"
_SILENCE_HINT = f"set {DISABLE_ENV_VAR}=1 to use the references without this message"


class KernelsUnavailable(Exception):
    """Why the kernels cannot be had, as one sentence with its fix (not raised to users)."""


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """Everything one build of the kernels depends on, and where its library lives.

    Attributes:
        sources: The translation units to compile (absolute paths).
        cflags: Flags for the C++ compiler.
        cuda_cflags: Flags for nvcc (empty without CUDA).
        ldflags: Flags for the linker.
        with_cuda: Whether the CUDA kernels are part of this build.
        description: What the build targets, for messages (``torch 2.13.0+cpu, AVX512``).
        directory: The cache directory of this build; it holds the library once built.
    """

    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    with_cuda: bool
    description: str
    directory: pathlib.Path

    @property
    def library(self) -> pathlib.Path:
        """The built shared library (it may not exist yet)."""
        return self.directory / f"{_LIBRARY_NAME}.so"

    @property
    def log(self) -> pathlib.Path:
        """The compiler output of a failed build."""
        return self.directory / "build.log"

    def forget_failure(self) -> None:
        """Drops the record of a failed build, so that the next import compiles it again."""
        (self.directory / _FAILED_MARKER).unlink(missing_ok=True)


def _source_dir() -> pathlib.Path | None:
    """The kernel sources: the installed copy, else the checkout's ``csrc/`` (editable installs)."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "torchgraph.cpp").is_file():
            return candidate
    return None


def _cache_root() -> pathlib.Path:
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return pathlib.Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "torchgraph" / "kernels"


def _cpu_flags() -> tuple[str, list[str]]:
    """The CPU capability torch uses here, and the flags that make ``at::vec`` use it."""
    # NOTE: [SIMD flags] without the CPU_CAPABILITY_* defines, at::vec::Vectorized<float> falls
    # back to its scalar implementation (~10x slower). The -m flags make the library require this
    # machine's instruction set, which is safe only because it is built on, and keyed to, the
    # machine that runs it (a cache shared with an older CPU gets a build of its own).
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if capability.startswith("AVX512"):
        flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        return "AVX512", ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", *flags]
    if capability == "AVX2":
        return "AVX2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
    return capability, []


def _cuda_arch_flags() -> list[str]:
    """``-gencode`` flags for the visible GPUs, else for every architecture this torch supports."""
    # NOTE: [CUDA arch] with no visible GPU and no TORCH_CUDA_ARCH_LIST, torch's own choice
    # (_get_cuda_arch_flags) raises IndexError; passing -gencode flags makes it step aside.
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch reads it
    if torch.cuda.device_count() > 0:
        capabilities = (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        arches = {f"{major}{minor}" for major, minor in capabilities}
    else:
        arches = {a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()}
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(arches, key=int)]


def _cuda_include_dirs() -> list[str]:
    """Header folders of the ``nvidia-*`` wheels a CUDA torch depends on (cusparse.h, ...)."""
    dirs = []
    for entry in sys.path:
        root = pathlib.Path(entry or ".") / "nvidia"
        if root.is_dir():
            dirs += [str(p) for p in sorted(root.glob("*/include")) + sorted(root.glob("*/*/include"))]
    return dirs


def _wants_cuda() -> bool:
    """Whether ``TORCHGRAPH_USE_CUDA=1`` asks for CUDA kernels and this torch has CUDA."""
    return os.environ.get(CUDA_ENV_VAR, "0") == "1" and torch.version.cuda is not None


def kernel_build(with_cuda: bool | None = None) -> KernelBuild:
    """Describes the build of the kernels for this machine, this torch and these sources.

    Args:
        with_cuda: Include the CUDA kernels. None reads ``TORCHGRAPH_USE_CUDA`` (default off).

    Returns:
        The :class:`KernelBuild`; its ``library`` exists when the build is cached.

    Raises:
        KernelsUnavailable: If this installation has no kernel sources.

    Example:
        >>> from torchgraph import _extension
        >>> build = _extension.kernel_build(with_cuda=False)
        >>> build.library.name
        'torchgraph_kernels.so'
    """
    source_dir = _source_dir()
    if source_dir is None:
        raise KernelsUnavailable(
            "this installation has no kernel sources (torchgraph/_csrc is missing). "
            "Reinstall torchgraph-fx from its wheel or sdist")
    with_cuda = _wants_cuda() if with_cuda is None else with_cuda and torch.version.cuda is not None
    capability, simd_flags = _cpu_flags()
    cflags = ["-O3", "-g0", "-Wno-unknown-pragmas", *simd_flags]
    # NOTE: gcc 12 reports maybe-uninitialized inside its own AVX-512 intrinsic headers
    # (_mm512_undefined_*) for every Vectorized<T> use: pure noise.
    cflags.append("-Wno-maybe-uninitialized")
    ldflags = []
    if sys.platform.startswith("linux"):
        # NOTE: without -fopenmp at::parallel_for silently runs everything on one thread.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    sources = sorted(source_dir.glob("*.cpp")) + sorted(source_dir.glob("cpu/*.cpp"))
    cuda_cflags = []
    if with_cuda:
        sources += sorted(source_dir.glob("cuda/*.cu"))
        cuda_cflags = ["-O3", *_cuda_arch_flags()]
        cuda_cflags += [f"-I{d}" for d in _cuda_include_dirs()]
    digest = hashlib.sha256()
    for item in (torch.__version__, torch.version.git_version, torch.version.cuda,
                 sys.implementation.cache_tag, platform.machine(), capability,
                 os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                 *cflags, *cuda_cflags, *ldflags):
        digest.update(f"{item}\0".encode())
    for path in sorted(p for p in source_dir.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
        digest.update(f"{path.relative_to(source_dir).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    device = "CPU + CUDA" if with_cuda else "CPU"
    name = f"torch{torch.__version__}-{sys.implementation.cache_tag}-{capability.lower()}"
    return KernelBuild(
        sources=tuple(str(p) for p in sources),
        cflags=tuple(cflags),
        cuda_cflags=tuple(cuda_cflags),
        ldflags=tuple(ldflags),
        with_cuda=with_cuda,
        description=f"torch {torch.__version__}, {capability}, {device}",
        directory=_cache_root() / f"{name}-{'cuda-' if with_cuda else ''}{digest.hexdigest()[:16]}",
    )


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """Holds an exclusive lock on ``lock_path``; the OS drops it if this process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent builds only waste time
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """Puts the ``ninja`` of the ``ninja`` wheel (or of this environment) on PATH for a build."""
    try:
        import ninja

        extra = [ninja.BIN_DIR]
    except (ImportError, AttributeError):
        extra = []
    extra.append(os.path.dirname(sys.executable))  # an un-activated venv's bin/
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*extra, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its log line about a missing CUDA runtime."""
    # NOTE: a CUDA torch on a machine without a GPU logs "No CUDA runtime is found, using
    # CUDA_HOME=..." when the module is first imported; it says nothing about a CPU build.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _check_toolchain(build: KernelBuild) -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        raise KernelsUnavailable(
            f"no C++ compiler was found (looked for `{compiler}`, the CXX environment variable "
            "or c++ on PATH). Install one (e.g. `apt-get install g++`), then run "
            "`torchgraph build-kernels`")
    with _ninja_on_path():
        ninja = shutil.which("ninja")
    if ninja is None:
        raise KernelsUnavailable(
            "the ninja build tool was not found. Install it (`pip install ninja`), then run "
            "`torchgraph build-kernels`")
    if build.with_cuda:
        home = _cpp_extension().CUDA_HOME
        if home is None:
            raise KernelsUnavailable(
                f"{CUDA_ENV_VAR}=1 asks for the CUDA kernels, but no CUDA toolkit (nvcc) was found. "
                "Install one and set CUDA_HOME, or unset the variable")
        # NOTE: [CUDA_HOME from a wrapper] without CUDA_HOME, torch takes the folder above the first nvcc on PATH;
        # a wrapper script there (/usr/local/bin/nvcc) makes it /usr/local, and the link fails on -lcudart
        # after minutes of nvcc. Checked first, with the fix.
        if not any((pathlib.Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "lib/x64")):
            raise KernelsUnavailable(
                f"{CUDA_ENV_VAR}=1 asks for the CUDA kernels, but the CUDA toolkit torch found at {home} has no "
                "lib64/libcudart.so (without CUDA_HOME, torch takes the folder above the first nvcc on PATH, "
                "which a wrapper script misleads). Set CUDA_HOME to the toolkit's folder (e.g. /usr/local/cuda), "
                "then run `torchgraph build-kernels`")


def _first_error(output: str) -> str:
    """The compiler's first error line of a failed build's output (else its first line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line[:300]
    return lines[0][:300] if lines else "no output"


def _compile(build: KernelBuild, quiet: bool) -> None:
    """Compiles ``build`` in a private folder, loads it, and publishes it in the cache."""
    cpp_extension = _cpp_extension()
    build.directory.mkdir(parents=True, exist_ok=True)
    for stale in (build.directory / _FAILED_MARKER, build.log):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    staging = tempfile.mkdtemp(prefix=f"{build.directory.name}.tmp-", dir=build.directory.parent)
    if not quiet:
        # NOTE: the one line a user sees while the first import compiles (80-90 s of CPU time).
        print(f"torchgraph: compiling its C++ kernels for {build.description} (once, a minute or "
              f"more; cached in {build.directory.parent}) ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, _ninja_on_path():
            warnings.simplefilter("always")
            built = cpp_extension.load(
                _LIBRARY_NAME,
                list(build.sources),
                extra_cflags=list(build.cflags),
                extra_cuda_cflags=list(build.cuda_cflags),
                extra_ldflags=list(build.ldflags),
                build_directory=staging,
                with_cuda=build.with_cuda,
                is_python_module=False,
                verbose=False,
            )
        # atomic: a concurrent reader sees no library or a whole one
        os.replace(built, build.library)
    except Exception as error:  # noqa: BLE001 - any failure means "no kernels", with its log
        if not quiet:
            print(" failed.", file=sys.stderr, flush=True)
        build.log.write_text(f"{type(error).__name__}: {error}\n")
        (build.directory / _FAILED_MARKER).write_text(f"{type(error).__name__}\n")
        raise KernelsUnavailable(
            f"compiling them failed ({_first_error(str(error))}). The compiler's output is in "
            f"{build.log}. {_RETRY_HINT}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f" done ({time.perf_counter() - start:.0f} s).", file=sys.stderr, flush=True)
    if caught:
        (build.directory / "build-warnings.log").write_text("\n".join(str(w.message) for w in caught))


def build_kernels(*, retry_failed: bool = False, quiet: bool = False,
                  with_cuda: bool | None = None) -> pathlib.Path:
    """Loads the kernels into this process, compiling them first unless they are cached.

    Args:
        retry_failed: Compile again even if the last build of the same sources failed.
        quiet: Print nothing while compiling.
        with_cuda: Include the CUDA kernels. None reads ``TORCHGRAPH_USE_CUDA`` (default off).

    Returns:
        The path of the loaded library.

    Raises:
        KernelsUnavailable: If they cannot be had; the message says why and what to do.
    """
    build = kernel_build(with_cuda)
    if not build.library.exists():
        if (build.directory / _FAILED_MARKER).exists() and not retry_failed:
            raise KernelsUnavailable(
                f"compiling them failed before (the compiler's output is in {build.log}). {_RETRY_HINT}")
        _check_toolchain(build)
        try:
            build.directory.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KernelsUnavailable(
                f"the kernel cache {build.directory.parent} cannot be created ({error}). "
                f"Set {CACHE_ENV_VAR} to a writable folder") from None
        with _exclusive(build.directory.parent / f"{build.directory.name}.lock"):
            if build.library.exists():  # another process built it while we waited
                torch.ops.load_library(str(build.library))
                return build.library
            _compile(build, quiet)  # compiling also loads it
            return build.library
    try:
        torch.ops.load_library(str(build.library))
    except (OSError, RuntimeError) as error:
        raise KernelsUnavailable(
            f"the cached library {build.library} does not load ({error}). Delete "
            f"{build.directory} and run `torchgraph build-kernels`") from None
    return build.library


def _load_c_ops() -> tuple[bool, str | None, pathlib.Path | None]:
    if os.environ.get(DISABLE_ENV_VAR, "0") == "1":
        return False, f"disabled by {DISABLE_ENV_VAR}=1", None
    try:
        return True, None, build_kernels()
    except KernelsUnavailable as error:
        reason = str(error)
    # NOTE: this module body runs once per process, so each warning below is issued once.
    if _wants_cuda():
        try:
            path = build_kernels(with_cuda=False)
        except KernelsUnavailable as cpu_error:
            reason = f"{reason}; without CUDA: {cpu_error}"
        else:
            warnings.warn(
                f"torchgraph: its CUDA kernels are not available: {reason}. The CPU kernels are "
                "loaded; ops on CUDA tensors use pure-PyTorch references (same results, slower).",
                RuntimeWarning, stacklevel=2)
            return True, None, path
    warnings.warn(
        f"torchgraph: its compiled kernels are not available: {reason}. torchgraph.ops uses "
        f"pure-PyTorch references instead (same results, slower); {_SILENCE_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False, reason, None


#: True when the compiled kernels are registered under ``torch.ops.torchgraph``.
HAS_C_OPS: bool
#: Why they are not (None when HAS_C_OPS is True).
LOAD_ERROR: str | None
#: The loaded library (None when HAS_C_OPS is False).
LIBRARY_PATH: pathlib.Path | None
HAS_C_OPS, LOAD_ERROR, LIBRARY_PATH = _load_c_ops()
