"""``make bench``: every Rempart benchmark, one after the other, then a summary.

Runs ``tools/bench_smtp.py`` (always) and ``tools/bench_relay.py`` / ``tools/bench_policy.py`` /
``tools/bench_auth.py`` / ``tools/bench_imap.py`` when they exist, each as its own process with
its own output, so that one benchmark's processes and memory never colour another's figures.
``--quick`` is passed through to each (every ``tools/bench_*.py`` should accept it: small sizes
for a smoke run; one that does not is run at its own sizes, with a note). Lines a benchmark prints
that start with ``ratio``, ``rempart``, ``postfix`` or ``RESULT`` are repeated in the summary.
The exit code is non-zero when any benchmark failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
BENCHMARKS = ("bench_smtp.py", "bench_relay.py", "bench_policy.py", "bench_auth.py", "bench_imap.py")
REQUIRED = ("bench_smtp.py",)
SUMMARY_PREFIXES = ("RESULT", "ratio", "rempart", "postfix", "smtp-edge peak")
MAX_SUMMARY_LINES = 30  # bench_imap prints 23


@dataclass
class Outcome:
    name: str
    exit_code: int
    seconds: float
    summary: list[str] = field(default_factory=list)


def stop_overdue(proc: subprocess.Popen[str], name: str, timeout: float) -> None:
    print(f"=== {name}: over {timeout:.0f}s, stopping it", flush=True)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_benchmark(script: Path, extra: list[str], timeout: float) -> Outcome:
    """Run one benchmark, echoing its output as it comes, keeping its result lines."""
    command = [sys.executable, str(script), *extra]
    print(f"\n=== {script.name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    summary: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        # A silent, hung benchmark must not hang `make bench`: a watchdog ends it.
        watchdog = threading.Timer(timeout, stop_overdue, args=(proc, script.name, timeout))
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.lstrip().startswith(SUMMARY_PREFIXES) and len(summary) < MAX_SUMMARY_LINES:
                    summary.append(line.rstrip())
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        finally:
            watchdog.cancel()
    return Outcome(script.name, code, time.monotonic() - started, summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every Rempart benchmark and summarise.")
    parser.add_argument("--quick", action="store_true", help="small sizes (passed to each benchmark)")
    parser.add_argument("--only", action="append", choices=[b.removesuffix(".py") for b in BENCHMARKS],
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="bound per benchmark, seconds")
    parser.add_argument("--profile", action="store_true",
                        help="benchmarks that can (smtp, relay) also write py-spy profiles and flame graphs")
    args = parser.parse_args(argv)

    outcomes: list[Outcome] = []
    for name in BENCHMARKS:
        if args.only and name.removesuffix(".py") not in args.only:
            continue
        script = TOOLS / name
        if not script.exists():
            if name in REQUIRED:
                outcomes.append(Outcome(name, 127, 0.0, [f"missing: {script}"]))
            else:
                print(f"\n=== {name}: not present, skipped", flush=True)
            continue
        extra: list[str] = []
        if args.quick:
            if "--quick" in script.read_text(errors="replace"):
                extra = ["--quick"]
            else:
                print(f"\n=== {name}: has no --quick option; running it at its own sizes", flush=True)
        if args.profile and "--profile" in script.read_text(errors="replace"):
            extra.append("--profile")
        outcomes.append(run_benchmark(script, extra, args.timeout))

    print("\n=== Summary" + (" (--quick)" if args.quick else ""))
    for outcome in outcomes:
        verdict = "ok" if outcome.exit_code == 0 else f"FAILED (exit {outcome.exit_code})"
        print(f"{outcome.name:<18} {verdict:<18} {outcome.seconds:8.1f} s")
        for line in outcome.summary:
            print(f"    {line}")
    return 0 if outcomes and all(o.exit_code == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
