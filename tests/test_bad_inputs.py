"""Every mistake a user can type gets one line on stderr, the right exit code, and loses nothing."""

import hashlib
from pathlib import Path

import pytest

from fedmnist import train
from helpers import ROOT, Background, file_size_limit, run_cli, train_main


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_workspace(root: Path) -> Path:
    """A working directory holding an earlier run and a few user files that must survive."""
    earlier = root / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("rounds: 2\n")
    (earlier / "metrics.jsonl").write_text('{"round": 1}\n')
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("mine\n")
    (root / "malformed.yaml").write_text("rounds: [1, 2\n")
    (root / "list.yaml").write_text("- rounds\n")
    (root / "a-file").write_text("not a directory\n")
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_workspace(tmp_path)


CASES = [
    (["--rounds", "0"], "rounds: must be at least 1"),
    (["--rounds", "two"], "argument --rounds: invalid int value: 'two'"),
    (["--set", "roundz=3"], "unknown key 'roundz' (did you mean 'rounds'?)"),
    (["--set", "client_optimizer.learnig_rate=0.1"], "did you mean 'client_optimizer.learning_rate'?"),
    (["--set", "client_optimizer.learning_rate=0"], "client_optimizer.learning_rate: must be greater than 0"),
    (["--set", "server_optimizer.learning_rate=-1"], "server_optimizer.learning_rate: must be greater than 0"),
    (["--dataset", "digits", "--clients-per-round", "50"], "clients_per_round: 50 is more than the 20 clients"),
    (["--set", "data.dirichlet_alpha=0"], "data.dirichlet_alpha: must be greater than 0"),
    (["--set", "rounds=1.5"], "rounds: expected an integer, got 1.5"),
    (["--set", "eval_every=-1"], "eval_every: must be at least 0"),
    (["--model", "resnet"], "model: 'resnet' is not linear, cnn, 2nn or module:function"),
    (["--dataset", "imagenet"], "data.dataset: 'imagenet' is not one of"),
    (["--set", "rounds"], "expected key=value"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--config", "malformed.yaml"], "config file malformed.yaml is not valid YAML at line 2"),
    (["--config", "list.yaml"], "must hold a mapping of settings"),
    (["--config", "notes"], "config file notes cannot be read"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--run-dir", "runs/earlier"], "run directory runs/earlier already exists"),
    (["--run-dir", "notes", "--overwrite"], "--overwrite refused: notes does not look like a fedmnist run"),
    (["--run-dir", "a-file/run"], "cannot create run directory a-file/run"),
    (["--run-dir", "a-file"], "--run-dir a-file is a file"),
    (["--resume", "notes"], "--resume notes: not a fedmnist run directory"),
    (["--resume", "runs/earlier", "--set", "rounds=3"], "--set cannot be combined with it"),
    (["--resume", "runs/earlier", "--model", "cnn"], "--model cannot be combined with it"),
    (["--set", "workers=[localhost]"], "is not host:port"),
    (["--set", "workers=localhost:8000"], "expected a list"),
    (["--set", "workers=[localhost:8000]", "--set", "num_workers=2"], "num_workers"),
    (["--set", "num_workers=0"], "at least 1"),
    (["--set", "client_input=fast"], "one of 'prepared', 'datasets'"),
]


@pytest.mark.unit
@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_and_config_errors(workspace, capsys, args, message):
    before = snapshot(workspace)
    code = train.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert snapshot(workspace) == before
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["earlier"]


@pytest.mark.unit
def test_explicit_emnist_without_data_or_network(workspace):
    done = train_main("--dataset", "emnist", "--set", f"data.cache_dir={workspace / 'notes'}",
                      "--set", "data.allow_download=false", "--run-dir", "new")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "federated EMNIST is not cached" in done.stderr
    assert (workspace / "notes" / "keep.txt").read_text() == "mine\n"


def test_divergence_is_named_and_exit_1(workspace):
    done = train_main("--dataset", "synthetic", "--rounds", "3", "--run-dir", "diverged", "--quiet",
                      "--set", "client_optimizer.learning_rate=1e30", "--set", "server_optimizer.learning_rate=1e30")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: training diverged at round")
    assert "Traceback" not in done.stderr


# Writes beyond 16 KiB fail, as a full disk fails a save.
SMALL_FILE_LIMIT = file_size_limit(16 * 1024)


def full_disk_cli(directory: Path):
    workspace = make_workspace(directory)
    return workspace, run_cli("--dataset", "digits", "--rounds", "2", "--run-dir", "full", "--quiet", cwd=workspace,
                              before_exec=SMALL_FILE_LIMIT, env=_env())


BACKGROUND = {"full_disk_run": Background(full_disk_cli)}


@pytest.fixture
def full_disk_run(tmp_path_factory):
    return BACKGROUND["full_disk_run"].result(tmp_path_factory)


def test_a_full_disk_on_save_is_one_line(full_disk_run):
    workspace, done = full_disk_run
    assert done.returncode == 1
    # TensorFlow's AutoGraph warns on its own when it cannot write its cache; the package's verdict
    # is the last line.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot ") and "File too large" in last and "Traceback" not in done.stderr
    assert (workspace / "notes" / "keep.txt").read_text() == "mine\n"


def _env():
    # No bytecode writes: a truncated .pyc would break later imports.
    return {"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
