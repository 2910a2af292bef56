"""Mutation testing (mutmut 3): how many planted bugs in the neuron arithmetic, the runtime modules, the
calibration and the passes do the fast tests catch? Too slow for CI (an hour or more on 2 shared cores): run
by hand, niced.

    pip install mutmut==3.8.1
    nice -n 19 python benchmarks/mutation.py [--work /tmp/snnconv-mutation] [--files runtime/torch_backend.py ...]
    nice -n 19 python benchmarks/mutation.py --work ... --rerun   # after adding tests: survivors again

mutmut wants one package under src/, so the script lays the tree out as installed (snnconv/, with
passes/ and runtime/ inside) in a scratch folder, runs `mutmut run` there with only the fast test files
that exercise these modules (mutmut runs, for each mutant, the selected tests that call its function), and
writes benchmarks/results/mutation.txt: the commands, the score per file, the survivors judged equivalent
(EQUIVALENT below, with the reason) and every other survivor's diff. mutmut does not mutate decorated
functions, so the bodies of the passes themselves (@contract) are not mutated, only their helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["runtime/torch_backend.py", "runtime/modules.py", "snnconv/calibrate.py", "passes/*.py"]
TESTS = [
    "tests/test_neurons.py",
    "tests/test_kernels.py",
    "tests/test_methods.py",
    "tests/test_passes.py",
    "tests/test_convert.py",
    "tests/test_contracts.py",
    "tests/test_integer_spikes.py",
    "tests/test_mutants.py",
    "tests/test_frontend.py",
    "tests/test_errors.py",
    "tests/test_streaming.py",
    "tests/test_cpu_kernel.py",
]
# left out of the selection (all run in CI): tests/test_threads.py (more than half of the selection's time,
# it checks concurrency, not arithmetic), a subprocess run of the int8 path (80 s, and mutmut cannot see
# into a subprocess), a peak-memory measurement and the CUDA kernels' compilation to PTX
DESELECT = [
    "tests/test_integer_spikes.py::test_integer_paths_without_vnni",
    "tests/test_passes.py::test_peak_memory_falls_with_chunk_size",
    "tests/test_kernels.py::test_every_variant_compiles_to_ptx",
]
_INSTALLED = {"snnconv": "src/snnconv", "passes": "src/snnconv/passes", "runtime": "src/snnconv/runtime"}


# Survivors judged equivalent: (function, a fragment of the mutated line, why no test can tell them apart).
# Matched on the mutated text, not mutmut's numbers, so the list survives renumbering.
_ONE = "multiplying by a decay of exactly 1.0 is exact (x * 1.0 == x), and decay = 1 - 1/tau is never 2"
_FALSY = "a flag only ever read for its truth: None is as false as False"
_CPU = "a device move that is a no-op when input, bias and threshold share one device (CPU-only run; test_gpu.py)"
EQUIVALENT: list[tuple[str, str, str]] = [
    ("multistep_functional", "(decay != 1.0) or True", _ONE),
    ("multistep", "decay != 2.0", _ONE),
    ("multistep_burst", "decay != 2.0", _ONE),
    ("multistep_functional", "decay != 2.0", _ONE),
    (
        "multistep_functional",
        "(max_spikes == 1) and False",
        "for theta > 0, floor(h / theta) clamped to [0, 1] is (h >= theta): division is correctly rounded",
    ),
    ("multistep_functional", "(h >= theta).to(None)", "boolean spikes give the same s * theta and s > 0"),
    ("xǁNeuronǁforward", "(self.clip is not None) or True", "clamp(x, 0, None) is relu(x)"),
    ("xǁNeuronǁforward", "b.dim() >= 0", "a 0-d bias viewed as [1, 1, ...] adds the same"),
    ("xǁNeuronǁforward", "theta.dim() >= 0", "a 0-d threshold viewed as [1, ...]: the same comparisons and resets"),
    ("xǁNeuronǁforward", "self.bias.to(None, x.dtype)", _CPU),
    ("xǁNeuronǁforward", "self.bias.to(x.dtype)", _CPU),
    ("xǁNeuronǁforward", "theta.device == x.device", _CPU),
    ("xǁNeuronǁforward", "self.threshold = theta = theta.to(None)", _CPU),
    (
        "calibrate_bias",
        "max(2, settings.step_bytes_per_sample",
        "the floor matters only for an unmeasured model (0 bytes), where any floor leaves every batch in one sub-batch",
    ),
    ("calibrate_bias", "int(budget / per_sample)", "int() of a positive float truncates like //"),
    ("xǁNeuronǁ__init__", "self.fixed = None", _FALSY),
    ("xǁNeuronǁ__init__", "self.static_input = None", _FALSY),
    ("xǁSpikeMaxPoolǁ__init__", "self.static_input = None", _FALSY),
    ("_channel_sums", "t.numel() / t.shape[1]", "an exact quotient either way, only dividing float64 sums"),
    (
        "multistep_burst",
        "theta = theta.to(None)",
        "a float32 threshold is exact in float64, and type promotion computes in v's dtype either way",
    ),
    ("xǁNeuronǁ_code_buffer", "torch.uint8, None)", _CPU),
    (
        "multistep",
        "torch.empty(out.shape, device=v.device)",
        "the default dtype, float32, is the state's whenever out's differs (v is float64 only for float64 x)",
    ),
    ("multistep", "torch.empty(out.shape, dtype=v.dtype, )", _CPU),
]


def _installed_path(path: str) -> str:
    top, rest = path.split("/", 1)
    return f"{_INSTALLED[top]}/{rest}"


def _selection(tests: list[str]) -> list[str]:
    chosen = [t for t in tests if (ROOT / t).exists()]
    return chosen + [a for d in DESELECT if d.split("::")[0] in chosen for a in ("--deselect", d)]


def _layout(work: Path, files: list[str], tests: list[str]) -> None:
    if work.exists():
        shutil.rmtree(work)
    for src, dst in _INSTALLED.items():
        shutil.copytree(ROOT / src, work / dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    _config(work, files, tests)


def _config(work: Path, files: list[str], tests: list[str]) -> None:
    toml = [
        "[tool.pytest.ini_options]",
        "addopts = \"-m 'not slow' -p no:cacheprovider\"",
        'markers = ["slow: long", "gpu: needs a CUDA device"]',
        "",
        "[tool.mutmut]",
        'source_paths = ["src/"]',
        f"only_mutate = {[_installed_path(f) for f in files]!r}",
        f"pytest_add_cli_args_test_selection = {_selection(tests)!r}",
        'process_isolation = "forkserver"',  # torch is not fork-safe once it has run
        # mutmut's timeouts are wall-clock: generous, so that a run starved by other jobs on the machine
        # (nice -n 19) does not count slow-but-passing test runs as killed
        "timeout_multiplier = 5.0",
        "timeout_constant = 30.0",
    ]
    (work / "pyproject.toml").write_text("\n".join(toml) + "\n")


def _results(work: Path, mutmut: str) -> dict[str, list[str]]:
    """Mutant names by status ('killed', 'survived', 'no tests', 'timeout', 'not checked', ...)."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True).stdout
    by_status: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            by_status.setdefault(status, []).append(name)
    return by_status


def _forget(work: Path, names: set[str]) -> None:
    """Mark these mutants unchecked, so that the next `mutmut run` tests them again."""
    for meta in (work / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        if names & codes.keys():
            codes.update({k: None for k in names & codes.keys()})
            meta.write_text(json.dumps(data))


def _module(name: str) -> str:
    return name.split(".x", 1)[0]  # snnconv.runtime.modules.xǁNeuronǁforward__mutmut_3 -> the module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/snnconv-mutation")
    ap.add_argument("--files", nargs="+", default=FILES, help="repository paths (globs) to mutate")
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/mutation.txt"))
    ap.add_argument("--report-only", action="store_true", help="summarise a finished run in --work")
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="rerun a finished run's survivors, timeouts and untested mutants in --work against the current tests/",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        help="in an existing --work folder: run only the mutants matching these name globs "
        "(e.g. 'snnconv.runtime.torch_backend*'): a slow machine measures file by file",
    )
    args = ap.parse_args()
    work = Path(args.work)
    mutmut = shutil.which("mutmut", path=os.path.dirname(sys.executable)) or shutil.which("mutmut")
    if mutmut is None:
        sys.exit("mutation.py: error: mutmut not found beside this Python or on PATH: pip install mutmut==3.8.1")
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # children run side by side
    if args.rerun:  # the new tests get their stats run; survivors and untested mutants run again
        before = _results(work, mutmut)
        _forget(work, {n for s in ("survived", "no tests", "timeout") for n in before.get(s, [])})
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        _config(work, args.files, args.tests)  # the same selection (a new one would reset every result)
        subprocess.run([mutmut, "run", "--max-children", str(args.max_children)], cwd=work, env=env, check=False)
    elif args.only:
        subprocess.run([mutmut, "run", "--max-children", str(args.max_children), *args.only], cwd=work, env=env)
    elif not args.report_only:
        _layout(work, args.files, args.tests)
        subprocess.run([mutmut, "run", "--max-children", str(args.max_children)], cwd=work, env=env, check=False)
    by_status = _results(work, mutmut)
    total, per_file = Counter(), {}
    for status, names in by_status.items():
        for name in names:
            total[status] += 1
            per_file.setdefault(_module(name), Counter())[status] += 1
            if _module(name).startswith("snnconv.passes"):
                per_file.setdefault("snnconv.passes (all files)", Counter())[status] += 1
    survivors = by_status.get("survived", [])
    untested = Counter(name.rsplit("__mutmut_", 1)[0] for name in by_status.get("no tests", []))
    command = "python benchmarks/mutation.py " + " ".join(sys.argv[1:])
    history = work / "runs.txt"  # every run in this --work folder: the results merge them all
    if not args.report_only:
        with history.open("a") as f:
            f.write(f"{command}  ({(time.time() - t0) / 60:.0f} min)\n")
    diffs = {name: _diff(work, mutmut, name) for name in survivors}
    equivalent = {name: why for name in survivors if (why := _equivalent(name, diffs[name]))}
    lines = [
        f"command: {command}",
        f"mutmut 3, tests: {' '.join(args.tests)} (deselected: {' '.join(DESELECT)})",
        "runs in this work folder, in order (the results are the latest verdict of each mutant):",
        *[f"    {line}" for line in (history.read_text().splitlines() if history.exists() else [])],
        "",
        "score = killed / (killed + timeout + survived + no tests): a mutant no selected test runs counts",
        "against the score, and so does a timeout (mutmut's timeouts are wall-clock: on a machine busy with other",
        "jobs a slow but passing run times out, so a timeout is not counted as a kill). 'not checked': the run",
        "stopped before it (left out of the score).",
        "equivalent: survivors judged equivalent (listed below with the reason); 'score w/o equiv.' leaves",
        "them out of the denominator.",
        "",
        "file | mutants | killed | timeout | survived | of them equivalent | no tests | not checked | score | "
        "score w/o equiv.",
        "--- | --- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    eq_by_module = Counter(_module(name) for name in equivalent)
    in_passes = [v for k, v in eq_by_module.items() if k.startswith("snnconv.passes")]
    eq_by_module["snnconv.passes (all files)"] = sum(in_passes)
    for module, c in [*sorted(per_file.items()), ("all", total)]:
        killed, timeout, survived, no_tests = c["killed"], c["timeout"], c["survived"], c["no tests"]
        eq = len(equivalent) if module == "all" else eq_by_module[module]
        tested = killed + timeout + survived + no_tests
        score = f"{killed / tested:.1%}" if tested else "-"
        score_eq = f"{killed / (tested - eq):.1%}" if tested > eq else "-"
        lines.append(
            f"{module} | {sum(c.values())} | {killed} | {timeout} | {survived} | {eq} | {no_tests} | "
            f"{c['not checked']} | {score} | {score_eq}"
        )
    lines += ["", "functions no selected test runs (their mutants count as not killed):"]
    lines += [f"  {name}: {count} mutants" for name, count in sorted(untested.items())]
    lines += ["", f"survivors judged equivalent ({len(equivalent)}):"]
    for why in sorted(set(equivalent.values())):
        lines += [f"  {why}"]
        lines += [f"    {name}: {_one_line(diffs[name])}" for name in survivors if equivalent.get(name) == why]
    timeouts = by_status.get("timeout", [])
    lines += ["", f"timeouts ({len(timeouts)}): " + " ".join(timeouts)]
    rest = [name for name in survivors if name not in equivalent]
    lines += ["", f"survivors not judged equivalent ({len(rest)}):"]
    for name in rest:
        lines += [f"--- {name}", diffs[name], ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


def _diff(work: Path, mutmut: str, name: str) -> str:
    return subprocess.run([mutmut, "show", name], cwd=work, capture_output=True, text=True).stdout.strip()


def _changed(diff: str) -> tuple[list[str], list[str]]:
    lines = [line for line in diff.splitlines() if line[:1] in "-+" and line[:3] not in ("---", "+++")]
    return [x[1:].strip() for x in lines if x[0] == "-"], [x[1:].strip() for x in lines if x[0] == "+"]


def _one_line(diff: str) -> str:
    old, new = _changed(diff)
    return f"{' / '.join(old)}  ->  {' / '.join(new)}"


def _equivalent(name: str, diff: str) -> str | None:
    """The reason a surviving mutant is judged equivalent, if one of EQUIVALENT's rules matches it."""
    function = name.rsplit("__mutmut_", 1)[0]
    _, new = _changed(diff)
    for func, fragment, why in EQUIVALENT:
        if function.endswith(func) and any(fragment in line for line in new):
            return why
    return None


if __name__ == "__main__":
    main()
