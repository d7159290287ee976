"""Faults that need a second process: two runs on one workdir, a held lock, kill, Ctrl-C and SIGTERM. Each test
fails if the fault goes undetected: every run that finishes must report the clean run's numbers."""

import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAST_RUN, copy_workdir, rerun, results_rows

from jaxforget.workdir import Workdir

pytestmark = pytest.mark.usefixtures("cli_numerics")


_ENTRY = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from jaxforget.cli import main; sys.exit(main())"
)


def _start(args: list[str]) -> subprocess.Popen:
    """``jaxforget ARGS`` in a new process, with Python's own Ctrl-C handling (a test runner may ignore SIGINT)."""
    command = [sys.executable, "-c", _ENTRY, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(stream, marker: str, timeout: float = 300.0) -> str:
    """What the pipe ``stream`` says until ``marker`` appears in it, it closes, or ``timeout`` seconds pass."""
    text, deadline, descriptor = "", time.monotonic() + timeout, stream.fileno()
    while marker not in text and time.monotonic() < deadline:
        if select.select([descriptor], [], [], 1.0)[0]:
            chunk = os.read(descriptor, 4096).decode()
            if not chunk:
                break
            text += chunk
    return text


def _without_unlearning(work: pathlib.Path) -> None:
    seed = work / "seed-0"
    shutil.rmtree(seed / "unlearned")
    for pattern in ("unlearn.*.json", "evaluate.*.json"):
        for path in seed.glob(pattern):
            path.unlink()


def test_two_runs_with_different_settings_on_one_workdir_each_report_their_own_numbers(clean_run, tmp_path):
    # The reproduction of the worst defect: before, the first run reported the second one's unlearned models.
    other = ["--tau", "3e-3", "--damping", "0.5"]
    reference = tmp_path / "reference"
    shutil.copytree(clean_run / "work", reference)
    assert rerun(reference, tmp_path / "reference-out", *other) == 0
    work = copy_workdir(clean_run, tmp_path)
    _without_unlearning(work)
    common = [*FAST_RUN, "--workdir", str(work), "--quiet"]
    first = _start(["run", *common, "--out", str(tmp_path / "first")])
    time.sleep(2)
    second = _start(["run", *common, *other, "--out", str(tmp_path / "second")])
    for process in (first, second):
        _, error = process.communicate(timeout=600)
        assert process.returncode == 0, error
    assert results_rows(tmp_path / "first") == results_rows(clean_run / "out")
    assert results_rows(tmp_path / "second") == results_rows(tmp_path / "reference-out")
    assert results_rows(tmp_path / "first") != results_rows(tmp_path / "second")


def test_a_second_run_waits_for_the_lock_or_fails_at_once_with_no_wait(clean_run, tmp_path):
    work = copy_workdir(clean_run, tmp_path)
    args = ["train", *FAST_RUN, "--workdir", str(work), "--quiet"]
    with Workdir(work / "seed-0").lock():
        refused = _start([*args, "--no-wait"])
        _, error = refused.communicate(timeout=300)
        assert refused.returncode == 2
        assert error.strip() == (
            f"jaxforget: error: --workdir: {work / 'seed-0'} is in use by another jaxforget run (pid {os.getpid()}); "
            "wait for it (drop --no-wait), or choose another --workdir."
        )
        waiting = _start(args)
        # Until it says it waits (a fixed sleep let a run still starting up on a loaded machine reach the lock only
        # after its release, so that it never waited).
        said = _read_until(waiting.stderr, f"waiting for the jaxforget run with pid {os.getpid()}")
        assert f"waiting for the jaxforget run with pid {os.getpid()}" in said
        time.sleep(1)
        assert waiting.poll() is None  # still waiting for the lock
    _, error = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, said + error


def _signal_mid_unlearn(clean_run, tmp_path, signum) -> tuple[subprocess.Popen, pathlib.Path, str]:
    """Starts a run that must unlearn, and sends ``signum`` once the first unlearned model is on disk."""
    work = copy_workdir(clean_run, tmp_path)
    _without_unlearning(work)
    process = _start(["run", *FAST_RUN, "--workdir", str(work), "--out", str(tmp_path / "out"), "--quiet"])
    deadline = time.monotonic() + 300
    while not list((work / "seed-0").glob("unlearned/*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, error = process.communicate(timeout=300)
    return process, work, error


def test_a_killed_run_resumes_to_the_clean_numbers(clean_run, tmp_path):
    process, work, _ = _signal_mid_unlearn(clean_run, tmp_path, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not list((work / "seed-0").glob("evaluate.*.json"))  # it died before finishing
    assert rerun(work, tmp_path / "resumed") == 0
    assert results_rows(tmp_path / "resumed") == results_rows(clean_run / "out")


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_ends_in_one_line_and_keeps_what_finished(signum, code, word, clean_run, tmp_path):
    process, work, error = _signal_mid_unlearn(clean_run, tmp_path, signum)
    assert process.returncode == code, error
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1] == f"jaxforget: {word}; finished stages are kept, rerun to resume"
    assert list((work / "seed-0").glob("unlearned/*.json"))  # kept
    assert rerun(work, tmp_path / "resumed") == 0
    assert results_rows(tmp_path / "resumed") == results_rows(clean_run / "out")
