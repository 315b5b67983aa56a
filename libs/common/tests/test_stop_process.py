"""stop_process: the one way tests, the harness and the benchmarks stop a process they started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from rempart.common.testing.localstack import stop_process


def test_a_process_that_ends_on_sigterm_is_not_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_process(proc, grace=10) == -signal.SIGTERM


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    assert stop_process(proc, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_group_stops_the_children_too_and_an_exited_process_is_left_alone() -> None:
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(c.pid, flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    stop_process(proc, grace=5, group=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    break  # a zombie waiting for init: dead
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the child outlived its group's stop")
    assert stop_process(proc) == proc.returncode  # already exited: nothing sent, same code
