"""A run name is a name: `--set name=../../escaped/x` or an absolute path must not put the run directory
outside runs/ (issue 27); `--run-dir` is the way to choose a place. Nor may a name be longer than a directory's
name can be."""

from __future__ import annotations

import pytest

from fedmnist import config as config_lib
from fedmnist.errors import ConfigError
from helpers import train_main


@pytest.mark.unit
@pytest.mark.parametrize("value, name", [("../../escaped/x", "../../escaped/x"), ("/tmp/escaped", "/tmp/escaped"),
                                         ("a/b", "a/b"), ("..", ".."), ("a\\b", "a\\b"), ('""', ""),
                                         ('"tab\\there"', "tab\there"), ("x" * 201, "x" * 201)])
def test_a_name_with_a_separator_or_too_long_is_refused_in_one_line_and_creates_nothing(value, name, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = train_main("--set", f"name={value}", "--quiet")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: name: {name!r} is not a run name"), done.stderr
    assert "--run-dir" in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no runs/, nothing escaped
    with pytest.raises(ConfigError, match="is not a run name"):
        config_lib.load(None, [f"name={value}"])
    assert config_lib.load(None, ["name=my-run_2.v1"]).name == "my-run_2.v1"
