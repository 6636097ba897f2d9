"""Just-in-time builds of lmstack's C++ CPU kernels (`torch.utils.cpp_extension.load`), shared by every
package that ships some (lmstack.compress's quantized GEMV/GEMM, the model's fused CPU ops, the
engine's paged attention).

A build takes about a minute once and is cached under ~/.cache/lmstack/kernels (or
$LMSTACK_KERNEL_CACHE), keyed by a hash of the sources, the headers and the torch version, so an edit or
a torch upgrade rebuilds and nothing stale is ever loaded. Where no compiler exists the build returns
None with one warning that says what to install; every caller then runs its plain PyTorch path.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

# -fopenmp: `at::parallel_for` in a header is an OpenMP loop; compiled without it, it silently runs on one
# thread. Linking resolves to the libgomp.so.1 torch already loaded (same soname), so there is one pool.
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]


def cache_dir(digest: str) -> Path:
    root = os.environ.get("LMSTACK_KERNEL_CACHE") or Path.home() / ".cache" / "lmstack" / "kernels"
    return Path(root) / digest


def build(name: str, csrc: Path, sources: list[str], headers: list[str], what: str):
    """The compiled module `name` from `csrc/sources` (hash covers `headers` too), or None with a warning
    naming `what` (e.g. "the quantized CPU kernels") when it cannot be built."""
    from torch.utils import cpp_extension

    files = [csrc / source for source in sources]
    digest = hashlib.sha256()
    for path in [*files, *(csrc / header for header in headers)]:
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(FLAGS).encode())
    # The build files name the sources by absolute path: two checkouts sharing one cache entry would
    # make ninja rebuild (about a minute) every time the other one ran.
    digest.update(str(csrc.resolve()).encode())
    key = digest.hexdigest()[:16]
    directory = cache_dir(key)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"{name}_{key}",
            sources=[str(f) for f in files],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to the PyTorch path
        warnings.warn(
            f"lmstack: {what} could not be built ({type(exc).__name__}: {str(exc)[:200]}); they run through "
            "plain PyTorch instead (correct, slower). Install a C++ compiler (g++ or clang) and ninja for the "
            "fast path.",
            stacklevel=3,
        )
        return None
