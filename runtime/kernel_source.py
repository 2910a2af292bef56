"""The CUDA neuron kernel's source and variants: one place that names them for NVRTC, nvcc and the host build."""

from __future__ import annotations

import itertools
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCE = KERNEL_DIR / "neuron.cu"
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


VECS = (1, 4)


def name(dtype: str, vec: int, static: bool, soft: bool, leak: bool, count: bool, signed: bool = False) -> str:
    b = lambda f: "true" if f else "false"  # noqa: E731
    return f"snn_neuron<{DTYPES[dtype]}, {vec}, {b(static)}, {b(soft)}, {b(leak)}, {b(count)}, {b(signed)}>"


def all_variants() -> list[tuple]:
    """(dtype, vec, static, soft, leak, count, signed) for every compiled kernel: signed spikes only with
    soft reset and the count (their net count)."""
    binary = [(*f, False) for f in itertools.product((False, True), repeat=4)]
    signed = [(static, True, leak, True, True) for static in (False, True) for leak in (False, True)]
    return [(d, vec, *flags) for d in DTYPES for vec in VECS for flags in binary + signed]


def instantiations() -> str:
    """Explicit template instantiations of every variant (for ahead-of-time PTX and host builds)."""
    lines = []
    for v in all_variants():
        n = name(*v)
        t = "float" if v[0] == "float32" else "snn_u16"
        lines.append(
            f"template __global__ void {n}(const {t}*, {t}*, float*, const float*, float*, long long, "
            "int, int, long long, float, float);"
        )
    return "\n".join(lines)


def full_source() -> str:
    """The kernel source with every variant instantiated (what ahead-of-time compilers build)."""
    return SOURCE.read_text() + "\n" + instantiations() + "\n"
