"""cffi build script (API mode) for the C tag kernel, `kvmtag._tagkernel`.

setup.py names `cdefs/build_tagkernel.py:ffibuilder` in `cffi_modules`, so an install builds
the extension. Run directly to build it in place, next to the sources, for a working tree:

    .venv/bin/python cdefs/build_tagkernel.py

Only kvmtag/tagkernel.py imports the result.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from cffi import FFI

# cffi's generated module uses the stable ABI where it can, and its setuptools hook then asks for
# py_limited_api: an install names the module _tagkernel.abi3.so. The in-place build below asks
# the same (with cffi's exceptions: debug and free-threaded CPython), so both write one file.
# With two names, whichever _tagkernel.cpython-3XX-*.so was built last would shadow every later
# .abi3.so: the import system tries the version-specific suffix first.
STABLE_ABI = not (hasattr(sys, "gettotalrefcount") or sysconfig.get_config_var("Py_GIL_DISABLED"))

CDEFS = Path(__file__).resolve().parent
PROJECT_ROOT = CDEFS.parent

ffibuilder = FFI()

# Mirrors tagkernel.h (which documents each function and the packed nibble order). API mode
# compiles the module against the real header, so a prototype that drifts from it fails the
# build instead of corrupting memory at run time. `restrict` is left out: cffi does not need it.
ffibuilder.cdef(
    """
    void kt_pack(uint8_t *dst, const uint8_t *src, size_t ngranules);
    void kt_unpack(uint8_t *dst, const uint8_t *src, size_t ngranules);
    int kt_is_zero(const uint8_t *buf, size_t len);
    void kt_fill(uint8_t *packed, size_t first_granule, size_t ngranules, unsigned tag);
    size_t kt_find_mismatch(const uint8_t *packed, size_t first_granule, size_t ngranules,
                            unsigned tag);
    void kt_zero_pages(uint8_t *bitmap, const uint8_t *buf, size_t npages, size_t page_bytes);
    size_t kt_bitmap_andnot(uint64_t *bitmap, uint64_t *mask, size_t nwords);
    void kt_bitmap_set(uint8_t *bitmap, size_t first, size_t n);
    size_t kt_bitmap_count(const uint8_t *bitmap, size_t first, size_t n);
    #define KT_GROUP_BITS ...
    #define KT_EMPTY ...
    #define KT_ZERO ...
    struct kt_slab {
        uint8_t **arenas;
        size_t max_arenas;
        unsigned arena_shift;
        size_t slot_bytes;
        size_t nslots;
        size_t slot_limit;
    };
    struct kt_table {
        uint64_t *entries;
        size_t capacity;
        unsigned hash_shift;
        size_t count;
        size_t max_count;
    };
    uint32_t kt_table_get(const struct kt_table *t, uint32_t key);
    void kt_table_rehash(struct kt_table *dst, const struct kt_table *src);
    void kt_store_read(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                       size_t npages, uint8_t *dst);
    void kt_store_read_packed(const struct kt_table *t, const struct kt_slab *s, uint32_t key,
                              size_t npages, uint8_t *dst);
    size_t kt_store_write(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages,
                          const uint8_t *src);
    size_t kt_store_clear(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t npages);
    int kt_store_fill(struct kt_table *t, struct kt_slab *s, uint32_t key, size_t first_granule,
                      size_t ngranules, unsigned tag);
    size_t kt_store_find_mismatch(const struct kt_table *t, const struct kt_slab *s,
                                  uint32_t key, size_t first_granule, size_t ngranules,
                                  unsigned tag);
    int kt_guard_install(void);
    int kt_guarded_copy(void *dst, const void *src, size_t n);
    """
)

ffibuilder.set_source(
    "kvmtag._tagkernel",
    '#include "tagkernel.h"\n#include "guarded.h"',
    # Relative to the project root, the build's working directory (setuptools runs there, and
    # compile() below moves there): distutils puts each object file at build_temp/<source path>,
    # so an absolute path would recreate /work/... inside the tree.
    sources=[
        str((CDEFS / name).relative_to(PROJECT_ROOT)) for name in ("tagkernel.c", "guarded.c")
    ],
    include_dirs=[str(CDEFS)],
    # -O3: gcc vectorises the pack/unpack byte loops only at -O3 (gcc 12 at -O2: 0.28× memcpy
    # instead of 1.2×; see tagkernel.c). No -march: the extension must run on any CPU of its
    # architecture (SSE2 is x86-64's baseline, NEON arm64's).
    extra_compile_args=["-O3", "-Wall"],
    py_limited_api=STABLE_ABI,
)

if __name__ == "__main__":
    # tmpdir = the project root: the module `kvmtag._tagkernel` then lands in kvmtag/ in place
    # (its generated C source too, which .gitignore lists).
    ffibuilder.compile(tmpdir=str(PROJECT_ROOT), verbose=True)
