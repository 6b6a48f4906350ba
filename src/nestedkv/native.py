"""The package's C kernels for the CPU, built with the system's C compiler the first time a process needs one.

Each kernel is one C file beside the module that calls it through ``ctypes`` (:mod:`nestedkv.cache.cpu_kernel`
for ragged attention, :mod:`nestedkv.scoring_cpu` for the score's anomalies). A build takes about 0.2 s and
uses this CPU's vector instructions (``-march=native``), so a binary is never shared between machines. Where
no compiler works, or ``NESTEDKV_CPU_KERNEL=0`` is set, :func:`build` gives ``None`` and the callers use
their tensor paths: same answers, slower.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Tried in order: the fastest build this compiler accepts (vector instructions of this CPU, OpenMP
# threads), down to a plain one. -ffast-math is for the compile step only: linking with it would set
# flush-to-zero for the whole process (crtfastmath), so the link step is separate.
_BUILDS = (
    ("-O3", "-ffast-math", "-march=native", "-fopenmp"),
    ("-O3", "-ffast-math", "-fopenmp"),
    ("-O3", "-ffast-math"),
)


def build(source: Path) -> ctypes.CDLL | None:
    """``source`` compiled and loaded (callers cache it, once per process); ``None`` where kernels are
    disabled or no build works."""
    if os.environ.get("NESTEDKV_CPU_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    directory = tempfile.mkdtemp(prefix="nestedkv-kernel-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    obj, library = os.path.join(directory, "kernel.o"), os.path.join(directory, "kernel.so")
    for flags in _BUILDS:
        openmp = [flag for flag in flags if flag == "-fopenmp"]
        try:
            subprocess.run([compiler, *flags, "-fPIC", "-c", str(source), "-o", obj], check=True, capture_output=True)
            subprocess.run([compiler, "-shared", *openmp, obj, "-o", library, "-lm"], check=True, capture_output=True)
            return ctypes.CDLL(library)
        except (OSError, subprocess.CalledProcessError):
            continue
    return None
