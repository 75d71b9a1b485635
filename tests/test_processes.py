"""Child processes the package starts (`fedmnist.runtime.processes.dying_with_parent`): started without a
fork of this multi-threaded process, and killed by the kernel when their parent dies."""

import os
import subprocess
import sys
import threading

from fedmnist import runtime
from fedmnist.runtime.processes import dying_with_parent
from helpers import ROOT, wait_for


def test_starting_a_worker_forks_nothing_here(tmp_path):
    # A fork runs every fork handler in the child before exec (gRPC's once aborted a worker's start there);
    # Python's own handlers run on the same forks, so none may run while a worker starts.
    forks = []  # the threads that forked (other threads of this test process may start processes meanwhile)
    os.register_at_fork(before=lambda: forks.append(threading.get_ident()))
    worker = runtime.LocalWorker(log_path=tmp_path / "worker.log")
    try:
        worker.connect()
        assert worker.process.poll() is None
    finally:
        worker.stop()
    assert threading.get_ident() not in forks


def test_the_command_dies_with_its_parent_even_by_sigkill(tmp_path):
    # A parent that starts `sleep` the package's way and prints its pid; SIGKILL the parent, and the kernel
    # kills the sleep.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from fedmnist.runtime.processes import dying_with_parent\n"
         "child = subprocess.Popen(dying_with_parent(['/bin/sleep', '600']))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(parent.stdout.readline())
    wait_for(lambda: _command(child).startswith("/bin/sleep"), "the child never became the command")
    parent.kill()
    parent.wait()
    wait_for(lambda: not _alive(child), "the child outlived its parent's SIGKILL")


def test_the_command_gets_the_signal_dispositions_a_plain_start_gives():
    # The launcher is Python, which ignores SIGPIPE and SIGXFSZ; an exec keeps ignored signals ignored.
    def ignored(command: list[str]) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    status = ["/bin/grep", "^SigIgn", "/proc/self/status"]
    assert ignored(dying_with_parent(status)) == ignored(status)


def test_a_command_that_cannot_run_exits_127_with_one_line(tmp_path):
    done = subprocess.run(dying_with_parent([tmp_path / "missing"]), capture_output=True, text=True)
    assert done.returncode == 127
    assert done.stderr == f"cannot run {tmp_path / 'missing'}: No such file or directory\n"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_background_work_starts_its_processes_with_the_sessions_environment(monkeypatch, tmp_path_factory, tmp_path):
    # Background work runs while other tests run, some with monkeypatched variables (test_bind's missing
    # compiler once reached another module's background CLI): its processes get the session's environment.
    from helpers import Background, run_command

    monkeypatch.setenv("FEDMNIST_TEST_VARIABLE", "this test's")
    show = [sys.executable, "-c", "import os; print(os.environ.get('FEDMNIST_TEST_VARIABLE'))"]
    work = Background(lambda directory: run_command(show, cwd=directory), "show_environment")
    assert work.result(tmp_path_factory).stdout == "None\n"
    assert run_command(show, cwd=tmp_path).stdout == "this test's\n"  # this test's own processes get its own
