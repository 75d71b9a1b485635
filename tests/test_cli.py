"""The `fedmnist` console script (fedmnist.cli, also `python -m fedmnist`): one entry point for the
train, report, describe, worker and bench commands, which answer bad usage before TensorFlow loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedmnist import cli
from helpers import python_command, run_command

COMMANDS = ["train", "report", "describe", "worker", "bench"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "fedmnist"


@pytest.mark.unit
def test_help_lists_every_command_and_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: fedmnist COMMAND") and err == ""
    listed = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == COMMANDS == list(cli.COMMANDS)
    for name, (module, _) in cli.COMMANDS.items():
        assert importlib.util.find_spec(module) is not None, name


@pytest.mark.unit
@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--train"]])
def test_no_or_an_unknown_command_is_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    if argv:
        assert err.strip().splitlines() == [f"error: unknown command {argv[0]!r} (see --help)"]
    else:
        assert err.startswith("usage: fedmnist COMMAND")


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["describe", "--dataset", "imagenet"], "data.dataset: 'imagenet' is not one of"),
    (["report", "no-such-run"], "no-such-run: no such run directory"),
    (["worker", "--port", "70000"], "between 1 and 65535"),
])
def test_commands_get_their_arguments_and_give_their_exit_codes(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[str(CONSOLE_SCRIPT)], python_command("fedmnist")],
                         ids=["fedmnist", "python -m fedmnist"])
def test_console_script_runs_the_commands(tmp_path, command):
    done = run_command([*command, "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "commands:" in done.stdout
    # `train` leaves the process through its own fast exit (fedmnist.train.exit_now), keeping its code.
    done = run_command([*command, "train", "--rounds", "0"], cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: rounds: must be at least 1")
    done = run_command([*command, "bench", "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "--workload" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_commands_check_their_arguments_before_tensorflow_loads(tmp_path):
    modules = ["fedmnist.cli", "fedmnist.train", "fedmnist.data", "fedmnist.data.population", "fedmnist.runtime",
               "fedmnist.runtime.worker", "fedmnist.outputs.report", "fedmnist.outputs.plots",
               "fedmnist.outputs.records", "fedmnist.outputs.metrics_log", "fedmnist.bench.main"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('tensorflow', 'tensorflow_federated') if m in sys.modules))")
    done = run_command([sys.executable, "-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
