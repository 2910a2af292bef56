"""Seeded bugs in the CUDA neuron kernel and its launcher, and which tests catch each (no GPU needed).

    python benchmarks/kernel_mutations.py [--tests tests/test_kernels.py] > benchmarks/results/kernel_mutations.txt

Each mutation edits one line of runtime/kernels/neuron.cu or runtime/cupy_backend.py in place, runs the
tests with pytest, and restores the file (also on error or Ctrl-C). A mutation no test catches is a gap.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL, LAUNCHER = "runtime/kernels/neuron.cu", "runtime/cupy_backend.py"

# name: (file, original text, mutated text)
MUTATIONS = {
    "kernel: fires on h > theta instead of h >= theta": (
        KERNEL,
        "const bool s = h >= th[k];",
        "const bool s = h > th[k];",
    ),
    "kernel: one channel for a whole 4-wide group": (
        KERNEL,
        "theta[C == 1 ? 0 : (int)(((i0 + k) / inner) % C)]",
        "theta[C == 1 ? 0 : (int)((i0 / inner) % C)]",
    ),
    # caught only by a layer of more than 2^31 elements (tests/test_kernels.py test_launcher_indexes_past_2_31_elements)
    "kernel: 32-bit (int) element index": (
        KERNEL,
        "const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
        "const int i0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
    ),
    "kernel: element index computed in 32 bits, then widened": (
        KERNEL,
        "const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
        "const long long i0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
    ),
    "kernel: step offset of x in 32 bits": (
        KERNEL,
        "snn_vload<Vec>(x + (long long)t * M + i0)",
        "snn_vload<Vec>(x + (int)(t * M) + i0)",
    ),
    "launcher: neuron count passed as a 32-bit int (the kernel reads a long long)": (
        LAUNCHER,
        "cp.int64(M),",
        "cp.int32(M),",
    ),
    "launcher: 4-wide accesses without the alignment check": (
        LAUNCHER,
        "vec = 4 if M % 4 == 0 and xk.data_ptr() % align == 0 and ok.data_ptr() % align == 0 else 1",
        "vec = 4 if M % 4 == 0 else 1",
    ),
    "launcher: inner from the NCHW shape (channels-last indexed wrongly)": (
        LAUNCHER,
        "inner = vk.stride(1) if C > 1 else 1",
        "inner = M // (v.shape[0] * C) if C > 1 else 1",
    ),
    "launcher: out written in whatever layout it has": (
        LAUNCHER,
        "ok = _strided(out, (steps, *shape), (M, *layout))",
        "ok = out",
    ),
    "launcher: x read in whatever layout it has": (
        LAUNCHER,
        "xk = _strided(x, shape, layout) if static else _strided(x, (steps, *shape), (M, *layout))",
        "xk = x",
    ),
    "launcher: a copied membrane is not copied back": (
        LAUNCHER,
        "for mine, theirs in ((ok, out), (vk, v), (ck, count)):",
        "for mine, theirs in ((ok, out), (ck, count)):",
    ),
    "launcher: empty inputs launched (0-block grid)": (
        LAUNCHER,
        "if M == 0 or steps == 0:",
        "if False:",
    ),
    "launcher: launch on the default stream, not the caller's": (
        LAUNCHER,
        "args, stream=stream)",
        "args)",
    ),
    "launcher: grid rounded down (last partial block lost)": (
        LAUNCHER,
        "((M // vec + _THREADS - 1) // _THREADS,)",
        "(max(1, M // vec // _THREADS),)",
    ),
}


def run_tests(tests: list[str]) -> tuple[list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    # one "FAILED path::test[id]" (or "ERROR ..." when a fixture's check fails) line per failing case
    failed = re.findall(r"^(?:FAILED|ERROR) [^:\s]+::(\w+)", proc.stdout, re.M)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    return failed, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", nargs="+", default=["tests/test_kernels.py"])
    args = ap.parse_args(argv)
    tests = "" if args.tests == ap.get_default("tests") else f" --tests {' '.join(args.tests)}"
    print(f"python benchmarks/kernel_mutations.py{tests}\nseeded bugs against {' '.join(args.tests)}\n")
    t0 = time.time()
    failed, summary = run_tests(args.tests)
    print(f"unmutated: {summary}")
    if failed:
        print("the unmutated tests fail; fix them first:", *failed, sep="\n  ")
        return 1
    gaps = 0
    for name, (rel, old, new) in MUTATIONS.items():
        path = ROOT / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(f"\n{name}: the line to mutate is not in {rel} exactly once; update this script")
            gaps += 1
            continue
        try:
            path.write_text(text.replace(old, new))
            failed, summary = run_tests(args.tests)
        finally:
            path.write_text(text)
        by_test = Counter(failed)
        gaps += not failed
        print(f"\n{name}\n  {rel}: {old!r} -> {new!r}\n  {summary}")
        for test, n in sorted(by_test.items()):
            print(f"    {test}: {n} failing case{'s' if n > 1 else ''}")
        if not failed:
            print("    NOT CAUGHT")
    print(f"\n{len(MUTATIONS) - gaps} of {len(MUTATIONS)} seeded bugs caught ({time.time() - t0:.0f} s)")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
