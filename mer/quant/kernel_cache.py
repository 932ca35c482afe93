"""numba's on-disk cache for the matmul kernels, invalidated when ANY module they use changes.

numba keys a cached function on the content of its own source file only. The matmul drivers
inline code from other modules (the VNNI and AVX2 intrinsics' IR builders, the portable kernels,
the row dequantizers), so an edit there would otherwise leave stale machine code in the cache. Importing
this module registers a cache locator that claims the functions of `KERNEL_MODULES` (only those)
and stamps them with a hash of `KERNEL_SOURCES`, every module whose code ends up in them; the
cache files go where numba would put them anyway (NUMBA_CACHE_DIR, else `__pycache__`). A new
module used by the kernels must be added to `KERNEL_SOURCES`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core import caching

PACKAGE_DIR = Path(__file__).resolve().parent
KERNEL_MODULES = ("matmul_quantized.py", "matmul_generic.py", "matmul_kquant.py", "kernels_portable.py", "kernels_mxfp4.py")
KERNEL_SOURCES = KERNEL_MODULES + (
    "kernels_vnni.py", "kernels_avx2.py", "kernels_kquant.py", "vector_ir.py", "dequant.py", "activation_k.py",
    "kernel_cache.py",
)


def sources_stamp() -> str:
    """A hash of the names and contents of the kernels' source modules."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update(name.encode())
        digest.update((PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()


class PackageStampedLocator(caching._CacheLocator):
    """Wraps numba's own locator for a kernel function; adds the sources stamp to its stamp."""

    def __init__(self, inner: caching._CacheLocator):
        self._inner = inner

    def ensure_cache_path(self) -> None:
        self._inner.ensure_cache_path()

    def get_cache_path(self) -> str:
        return self._inner.get_cache_path()

    def get_source_stamp(self) -> object:
        return (self._inner.get_source_stamp(), sources_stamp())

    def get_disambiguator(self) -> str:
        return self._inner.get_disambiguator()

    @classmethod
    def from_function(cls, py_func, py_file):  # type: ignore[no-untyped-def]
        path = Path(py_file).resolve()
        if path.parent != PACKAGE_DIR or path.name not in KERNEL_MODULES:
            return None
        for locator_class in caching.CacheImpl._locator_classes:
            if locator_class is not cls:
                inner = locator_class.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
        return None


if PackageStampedLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, PackageStampedLocator)
