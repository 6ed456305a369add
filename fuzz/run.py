"""Run a fuzz target with atheris (libFuzzer) and report executions, coverage and crashes.

    python -m fuzz.run TARGET [--seconds N | --runs N]   fuzz, starting from fuzz/corpus/TARGET
    python -m fuzz.run TARGET --replay FILE...           run the target once on each file (no fuzzing)
    python -m fuzz.run TARGET --replay FILE... --lines   the share of its module's function lines they run
    python -m fuzz.run all --seconds N                   each target in turn

Targets are in fuzz/targets.py. New inputs the fuzzer finds go to a work corpus (default
/var/tmp/nbd-postcopy-fuzz/TARGET, never the committed seeds); crashing inputs go to fuzz/crashes/.
The summary line is `TARGET: N executions, C coverage edges, K crashes (FILES)`; the exit status is 1
if the target crashed. Coverage counts the edges atheris instruments in nbd_postcopy's own modules.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
WORK = Path("/var/tmp/nbd-postcopy-fuzz")
TARGET_NAMES = ("nbd_server", "nbd_client", "device", "control")


def _worker(target: str, libfuzzer_args: list[str]) -> None:
    """In the child process: instrument nbd_postcopy, then hand control to libFuzzer (never returns)."""
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # the targets provoke warnings by the million
    with atheris.instrument_imports(include=["nbd_postcopy"]):
        import nbd_postcopy.device.control  # noqa: F401  (instrumented before the targets use them)
        import nbd_postcopy.device.device  # noqa: F401
        import nbd_postcopy.nbd.client_core  # noqa: F401
        import nbd_postcopy.nbd.protocol  # noqa: F401
        import nbd_postcopy.nbd.server_core  # noqa: F401
        import nbd_postcopy.nbd.zeros  # noqa: F401
    from fuzz.targets import TARGETS

    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[target])
    atheris.Fuzz()


def replay(target: str, files: list[str]) -> int:
    """Run the target on each file; print and count the ones that fail."""
    import logging

    from fuzz.targets import TARGETS

    logging.disable(logging.CRITICAL)
    failed = 0
    for name in files:
        try:
            TARGETS[target](Path(name).read_bytes())
        except Exception as exc:  # a finding: report it and go on
            failed += 1
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return failed


def _code_lines(code) -> set[int]:
    """The lines of the functions in `code` (module and class bodies run at import, before tracing)."""
    lines = set()
    if code.co_flags & 3 == 3:  # CO_OPTIMIZED | CO_NEWLOCALS: a function
        lines = {line for _, _, line in code.co_lines() if line is not None and line != code.co_firstlineno}
    for const in code.co_consts:
        if hasattr(const, "co_lines"):
            lines |= _code_lines(const)
    return lines


def line_coverage(target: str, files: list[str], modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{module file: (lines run, executable lines)} when the target runs on `files` (stdlib tracing)."""
    import importlib
    import logging

    from fuzz.targets import TARGETS

    logging.disable(logging.CRITICAL)
    paths = {importlib.import_module(m).__file__: m for m in modules}
    hit: dict[str, set[int]] = {path: set() for path in paths}

    def tracer(frame, event, arg):
        lines = hit.get(frame.f_code.co_filename)
        if lines is None:
            return None
        lines.add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        for name in files:
            try:
                TARGETS[target](Path(name).read_bytes())
            except Exception:
                pass
    finally:
        sys.settrace(None)
    result = {}
    for path, module in paths.items():
        executable = _code_lines(compile(Path(path).read_text(), path, "exec"))
        result[module] = (len(hit[path] & executable), len(executable))
    return result


COVERED_MODULES = {
    "nbd_server": ("nbd_postcopy.nbd.protocol", "nbd_postcopy.nbd.server_core", "nbd_postcopy.nbd.zeros"),
    "nbd_client": ("nbd_postcopy.nbd.protocol", "nbd_postcopy.nbd.client_core"),
    "device": ("nbd_postcopy.device.device",),
    "control": ("nbd_postcopy.device.control",),
}


def fuzz(target: str, seconds: int | None, runs: int | None, work: Path, log: Path | None = None) -> dict:
    """Fuzz one target in a child process; returns {"executions", "coverage", "crashes", "seconds", "status"}."""
    work_dir = work / target
    work_dir.mkdir(parents=True, exist_ok=True)
    CRASHES.mkdir(exist_ok=True)
    before = set(CRASHES.iterdir())
    args = [f"-artifact_prefix={CRASHES}/{target}-", "-print_final_stats=1", "-timeout=20", "-rss_limit_mb=2048",
            "-max_len=16384"]  # the largest client seeds are 13 KB
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    if runs is not None:
        args.append(f"-runs={runs}")
    args += [str(work_dir), str(CORPUS / target)]
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-m", "fuzz.run", target, "--worker", "--", *args],
                           cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace")
    output = child.stdout
    if log is not None:
        log.write_text(output)
    executions = re.findall(r"stat::number_of_executed_units: (\d+)", output)
    coverage = re.findall(r"^#\d+\s+\w+\s+cov: (\d+)", output, re.M)
    crashes = sorted(str(p) for p in set(CRASHES.iterdir()) - before)
    return {
        "executions": int(executions[-1]) if executions else 0,
        "coverage": int(coverage[-1]) if coverage else 0,
        "crashes": crashes,
        "seconds": round(time.monotonic() - started, 1),
        "status": child.returncode,
        "tail": "\n".join(output.splitlines()[-40:]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[1:3] == ["--worker", "--"]:
        _worker(argv[0], argv[3:])
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=(*TARGET_NAMES, "all"))
    parser.add_argument("--seconds", type=int, help="fuzz for this long (per target)")
    parser.add_argument("--runs", type=int, help="fuzz for this many executions (per target)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"work corpus directory (default {WORK})")
    parser.add_argument("--log", type=Path, help="keep libFuzzer's output in this directory")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run the target on these files only")
    parser.add_argument("--lines", action="store_true",
                        help="with --replay: print the share of the target's module lines the files run")
    args = parser.parse_args(argv)
    targets = TARGET_NAMES if args.target == "all" else (args.target,)
    if args.replay and args.lines:
        for target in targets:
            for module, (run_lines, total) in line_coverage(target, args.replay, COVERED_MODULES[target]).items():
                print(f"{target}: {module}: {run_lines} of {total} lines ({100 * run_lines / total:.0f}%)")
        return 0
    if args.replay:
        return 1 if any(replay(t, args.replay) for t in targets) else 0
    if args.seconds is None and args.runs is None:
        parser.error("give --seconds or --runs")
    status = 0
    for target in targets:
        log = None
        if args.log:
            args.log.mkdir(parents=True, exist_ok=True)
            log = args.log / f"{target}.log"
        result = fuzz(target, args.seconds, args.runs, args.work, log)
        crashes = f" ({', '.join(result['crashes'])})" if result["crashes"] else ""
        print(f"{target}: {result['executions']} executions in {result['seconds']}s, {result['coverage']} coverage edges, "
              f"{len(result['crashes'])} crashes{crashes}", flush=True)
        if result["status"] != 0:
            print(result["tail"], file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
