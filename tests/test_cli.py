"""The `fedmnist` console script (fedmnist.cli, also `python -m fedmnist`): one entry point for the
train, report, describe, worker and bench commands, which answer bad usage before TensorFlow loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedmnist import cli
from helpers import python_command, run_command

COMMANDS = ["train", "report", "describe", "worker", "bench", "reproduce"]
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
    temporary = tmp_path.parent / f"{tmp_path.name}-tmp"  # the command's own temporary directory goes too
    temporary.mkdir()
    done = run_command([*command, "train", "--rounds", "0"], cwd=tmp_path, env={"TMPDIR": str(temporary)})
    assert done.returncode == 2 and list(temporary.iterdir()) == []
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


# --- What the user types: usage lines, "did you mean" -----------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("command", ["train", "report", "describe", "worker"])
def test_help_names_the_command_as_typed(capsys, command):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fedmnist {command} ")
    assert "python -m" not in out.split("\n\n")[0] and "{describe}" not in out


@pytest.mark.unit
def test_the_python_m_forms_keep_their_names(capsys):
    from fedmnist import train
    from fedmnist.data import population

    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m fedmnist.train ")
    with pytest.raises(SystemExit):
        population.main(["describe", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fedmnist.data describe ") and "{describe}" not in out


@pytest.mark.unit
@pytest.mark.parametrize("argv, hint", [
    (["--clients_per_round", "5"], "(did you mean --clients-per-round?)"),
    (["--run_dir", "x"], "(did you mean --run-dir?)"),
    (["--tensorbord"], "(did you mean --tensorboard?)"),
    (["--clients_per_round=5", "--run_dir", "x"],
     "(did you mean --clients-per-round for --clients_per_round, --run-dir for --run_dir?)"),
])
def test_a_mistyped_option_gets_a_did_you_mean(capsys, argv, hint):
    from fedmnist import train

    assert train.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("error: unrecognized arguments: ") and line.endswith(f" {hint} (see --help)")


@pytest.mark.unit
def test_an_unknown_option_without_a_near_one_gets_no_guess(capsys):
    from fedmnist import train

    assert train.main(["--bogus"]) == 2
    assert capsys.readouterr().err.strip() == "error: unrecognized arguments: --bogus (see --help)"


@pytest.mark.unit
@pytest.mark.parametrize("assignment, hint", [
    ("learning_rate=0.1", "(did you mean 'client_optimizer.learning_rate', 'server_optimizer.learning_rate' or "
                          "'personalization.learning_rate'?)"),
    ("epochs=2", "(did you mean 'preprocess.epochs' or 'personalization.epochs'?)"),
    ("data.rounds=3", "(did you mean 'rounds'?)"),
    ("noise_multiplier=1", "(did you mean 'dp.noise_multiplier' or 'secure_dp.noise_multiplier'?)"),
    ("client_optimizer.learnig_rate=0.1", "(did you mean 'client_optimizer.learning_rate'?)"),
    ("roundz=3", "(did you mean 'rounds'?)"),
])
def test_set_suggests_the_nested_key(capsys, assignment, hint):
    from fedmnist import train

    assert train.main(["--set", assignment]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"error: unknown key '{assignment.split('=')[0]}' {hint}"
