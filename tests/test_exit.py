"""`runtime.exit.exit_now`: the command-line entry points end without the interpreter's teardown, and lose nothing.

Each case is a fresh interpreter (the teardown is what is under test), whose program ends with `exit_now(code)`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROGRAM = """
import atexit, sys, threading, time, weakref
from pathlib import Path
from mixmo_dist.runtime.exit import exit_now

out = Path(sys.argv[1])
thread_s = float(sys.argv[2])


class TornDown:
    # A module global's __del__ runs in the interpreter's teardown, and only there.
    def __del__(self):
        (out / "teardown").write_text("ran")


class Finalised:
    pass


kept = TornDown()
obj = Finalised()
weakref.finalize(obj, lambda: (out / "finalize").write_text("ran"))
atexit.register(lambda: (out / "atexit").write_text("ran"))
if thread_s:
    def late():
        time.sleep(thread_s)
        (out / "thread").write_text("ran")
    threading.Thread(target=late).start()  # not a daemon: Python waits for it
print("buffered line, never flushed by the program")  # stdout is a pipe here: block-buffered
sys.stderr.write("stderr line\\n")
exit_now(int(sys.argv[3]))
"""


def _run(tmp_path: Path, *, thread_s: float, code: int, **streams) -> subprocess.CompletedProcess:
    program = tmp_path / "prog.py"
    program.write_text(textwrap.dedent(PROGRAM))
    return subprocess.run(
        [sys.executable, str(program), str(tmp_path), str(thread_s), str(code)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        text=True,
        timeout=120,
        **(streams or {"capture_output": True}),
    )


@pytest.mark.parametrize("code", [0, 3, 130])
def test_exit_now_keeps_the_status_atexit_finalizers_and_buffered_output_and_skips_the_teardown(tmp_path, code):
    res = _run(tmp_path, thread_s=0, code=code)
    assert res.returncode == code, res.stderr
    assert res.stdout == "buffered line, never flushed by the program\n"
    assert res.stderr == "stderr line\n"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "finalize").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()  # the interpreter's teardown was skipped: what saves the time


def test_exit_now_with_a_non_daemon_thread_running_waits_for_it_as_python_does(tmp_path):
    res = _run(tmp_path, thread_s=1.0, code=4)
    assert res.returncode == 4, res.stderr
    assert (tmp_path / "thread").read_text() == "ran"  # os._exit now would have killed it mid-sleep
    assert (tmp_path / "atexit").read_text() == "ran"
    assert res.stdout == "buffered line, never flushed by the program\n"


def test_exit_now_on_a_full_disk_stdout_exits_120_as_python_does_not_0(tmp_path):
    """The buffered line cannot be written (/dev/full): the output is lost, so a status 0 must not say all went well;
    a failure status is kept as it is."""
    for code, want in ((0, 120), (3, 3)):
        with open("/dev/full", "w") as full:
            res = _run(tmp_path, thread_s=0, code=code, stdout=full, stderr=subprocess.PIPE)
        assert res.returncode == want, (code, res.stderr)
        assert (tmp_path / "atexit").read_text() == "ran"
