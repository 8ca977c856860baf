"""cffi build script (API mode, out-of-line): compiles the engine into shmcache._native.

The cdef is derived from native/shmcache.h so the header stays the single source of
truth: preprocessor lines become ``#define NAME ...`` (value taken from C) and array
bounds written with a macro become ``[...]``.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(
    os.path.join("native", f)
    for f in os.listdir(HERE)
    if f.endswith(".c") and not f.startswith("test_")
)
# Strict for the engine's own translation units; the generated wrapper silences the
# few warnings cffi's own code triggers (it is not ours to fix).
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fvisibility=hidden",
          "-D_GNU_SOURCE"]
if os.environ.get("SHMCACHE_SANITIZE"):
    CFLAGS = [f for f in CFLAGS if f != "-O2"] + [
        "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=undefined"]


def _cdef_from_header(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define SHMCACHE_H"):
            continue
        m = re.match(r"#define\s+(\w+)\s+\S+", s)
        if m:
            out.append(f"#define {m.group(1)} ...")
            continue
        if s.startswith("#"):
            continue
        out.append(re.sub(r"\[SHM_[A-Z_]+\]", "[...]", line))
    return "\n".join(out)


with open(os.path.join(HERE, "shmcache.h")) as fh:
    CDEF = _cdef_from_header(fh.read())

# The direct-call entry points (native/py/fastpath.c) are not part of the engine's
# public header: they exist only inside the Python extension.
CDEF += "\nint shm_py_fastseg(shm_cache *c, void *raise_fn, void *out_list);\n"

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "shmcache._native",
    '#pragma GCC diagnostic ignored "-Wunused-parameter"\n'
    '#pragma GCC diagnostic ignored "-Wmissing-field-initializers"\n'
    '#pragma GCC diagnostic ignored "-Wcast-function-type"\n'
    '#include "shmcache.h"\n'
    "int shm_py_fastseg(shm_cache *c, void *raise_fn, void *out_list);\n",
    sources=SOURCES + ["native/py/fastpath.c"],
    py_limited_api=False,
    include_dirs=["native"],
    extra_compile_args=CFLAGS,
    extra_link_args=(["-fsanitize=address,undefined"]
                     if os.environ.get("SHMCACHE_SANITIZE") else []),
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
