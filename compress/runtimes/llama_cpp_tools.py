"""llama.cpp's tools, shared library and converter, built once per machine from the pinned sdist.

The sdist of llama-cpp-python 0.3.36 vendors llama.cpp with `convert_hf_to_gguf.py`, its own gguf-py (newer
than PyPI's gguf of the same version number, and the one the converter needs) and the tools. `make install`
builds them into ~/.cache/compress/llama-cpp-0.3.36, or $COMPRESS_LLAMA_CPP (about 3 minutes on 2 idle cores,
longer under load):

    python -m compress.runtimes.llama_cpp_tools build

The Python bindings (llama-cpp-python, installed without a library of their own) load the library built
here through LLAMA_CPP_LIB_PATH, so the tools and the bindings run the very same llama.cpp.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python=={VERSION}"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-tokenize")
TARGETS = ("llama", *TOOLS)
# -march=native also turns on ggml's AMX kernels where the CPU has AMX; in this llama.cpp they die with SIGILL
# (tilezero in an OpenMP worker, K-quant matmuls, measured on a Xeon with amx_tile/amx_int8). They stay off.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_OPTIONS = (
    "-G", "Ninja", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class LlamaCppMissing(RuntimeError):
    """llama.cpp is not built on this machine; str() says how to build it."""


def home() -> Path:
    """Per machine, not per run: the build outlives runs, clones and test caches."""
    return Path(os.environ.get("COMPRESS_LLAMA_CPP") or Path.home() / ".cache" / "compress" / f"llama-cpp-{VERSION}")


def source() -> Path:
    """The unpacked sdist (its Python package llama_cpp, and vendor/llama.cpp)."""
    return home() / f"llama_cpp_python-{VERSION}"


def vendored() -> Path:
    return source() / "vendor" / "llama.cpp"


def binaries() -> Path:
    return home() / "build" / "bin"


def _stamp() -> Path:
    """Written when a build finishes; it names the options, so a build with other options is made again."""
    return home() / "built.ok"


def _built_with() -> str:
    return " ".join((VERSION, *CMAKE_OPTIONS, *TARGETS)) + "\n"


def missing() -> str | None:
    """None when llama.cpp is built here with our options, else what to do about it, in one sentence."""
    if _stamp().is_file() and _stamp().read_text() == _built_with():
        return None
    return (f"llama.cpp {VERSION} is not built on this machine ({home()}): run `make llama-cpp` "
            "(or `python -m compress.runtimes.llama_cpp_tools build`; about 3 minutes)")


def require() -> None:
    if reason := missing():
        raise LlamaCppMissing(reason)


def tool(name: str) -> Path:
    """The path of one of llama.cpp's tools, built here."""
    require()
    return binaries() / name


def environment(threads: int | None = None) -> dict[str, str]:
    """Variables for the bindings and tools: our library for the bindings, the thread count for OpenMP.

    OMP_WAIT_POLICY is left as the user sets it. Unset, libgomp spins briefly between ops, then sleeps: measured
    on the embedded model (2 threads, quiet machine), PASSIVE decodes at 270 tok/s against 5,700-6,200 unset or
    ACTIVE, since its many small ops each wait on a futex wake-up; under contention spinning costs instead
    (DEPENDENCIES.md). The policy in force is recorded beside every speed (verify/targets.py)."""
    extra = {"LLAMA_CPP_LIB_PATH": str(binaries())}
    if threads:
        extra["OMP_NUM_THREADS"] = str(threads)
    return extra


def converter_path() -> list[str]:
    """sys.path entries the vendored converter needs: its own folder (conversion/) and its gguf-py."""
    return [str(vendored()), str(vendored() / "gguf-py")]


def build(log=sys.stdout) -> None:
    """Download the pinned sdist, unpack it and build the library and tools; a finished build is kept."""
    if _stamp().is_file() and _stamp().read_text() == _built_with():
        print(f"llama.cpp {VERSION}: built already in {home()}", file=log)
        return
    for command in ("cmake", "ninja", "c++"):
        if shutil.which(command) is None:
            raise LlamaCppMissing(f"building llama.cpp needs {command} (Debian: apt-get install cmake ninja-build g++)")
    home().mkdir(parents=True, exist_ok=True)
    if not (vendored() / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=home()) as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            "-d", download, PACKAGE], check=True)
            archive = next(Path(download).glob("*.tar.gz"))
            with tarfile.open(archive) as sdist:
                sdist.extractall(home(), filter="data")
    print(f"llama.cpp {VERSION}: building {', '.join(TARGETS)} (about 3 minutes on 2 idle cores)", file=log, flush=True)
    subprocess.run(["cmake", "-S", str(vendored()), "-B", str(home() / "build"), *CMAKE_OPTIONS],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(home() / "build"), *TARGETS], check=True, stdout=subprocess.DEVNULL)
    _stamp().write_text(_built_with())


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m compress.runtimes.llama_cpp_tools build")
    build()
