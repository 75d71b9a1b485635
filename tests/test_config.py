"""The config: the tutorial's settings, shipped configs, overrides and one-line errors (fedmnist.config)."""

from pathlib import Path

import pytest
import yaml

from fedmnist import config as config_lib
from fedmnist.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.unit


def test_tutorial_yaml_is_the_default_config():
    assert config_lib.load(CONFIGS / "tutorial.yaml") == Config()
    assert yaml.safe_load((CONFIGS / "tutorial.yaml").read_text()) == config_lib.to_dict(Config())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(config_lib.load(path), Config)


def test_the_tutorial_settings():
    cfg = Config()
    assert (cfg.rounds, cfg.clients_per_round, cfg.client_selection) == (10, 10, "fixed")
    assert (cfg.preprocess.epochs, cfg.preprocess.batch_size) == (5, 20)
    assert (cfg.preprocess.shuffle_buffer, cfg.preprocess.prefetch_buffer) == (100, 10)
    assert (cfg.client_optimizer.name, cfg.client_optimizer.learning_rate) == ("sgd", 0.02)
    assert (cfg.server_optimizer.name, cfg.server_optimizer.learning_rate) == ("sgd", 1.0)


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    cfg = config_lib.load(None, ["client_optimizer.learning_rate=0.1", "data.dataset=digits",
                                 "rounds=3", "data.cache_dir=null"])
    assert cfg.client_optimizer.learning_rate == 0.1 and cfg.rounds == 3
    assert cfg.data.dataset == "digits" and cfg.data.cache_dir is None
    assert isinstance(config_lib.load(None, ["server_optimizer.learning_rate=1"]).server_optimizer.learning_rate, float)
    assert config_lib.load(None, ["client_optimizer.learning_rate=1e-3"]).client_optimizer.learning_rate == 0.001


@pytest.mark.parametrize("overrides, message", [
    (["roundz=3"], "unknown key 'roundz' (did you mean 'rounds'?)"),
    (["data.partion=iid"], "did you mean 'data.partition'?"),
    (["rounds=0"], "rounds: must be at least 1"),
    (["rounds=two"], "rounds: expected an integer"),
    (["rounds=true"], "rounds: expected an integer"),
    (["client_optimizer.learning_rate=0"], "client_optimizer.learning_rate: must be greater than 0"),
    (["client_optimizer.learning_rate=.nan"], "expected a finite number"),
    (["client_optimizer.learning_rate=fast"], "client_optimizer.learning_rate: expected a number, got 'fast'"),
    (["model=resnet"], "model: 'resnet' is not linear, cnn, 2nn or module:function"),
    (["data.dirichlet_alpha=-1"], "data.dirichlet_alpha: must be greater than 0"),
    (["data.dataset=digits", "clients_per_round=30"], "clients_per_round: 30 is more than the 20 clients"),
    (["data=3"], "data: expected a mapping"),
    (["rounds"], "expected key=value"),
    (["rounds.x=1"], "rounds: expected an integer"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as raised:
        config_lib.load(None, overrides)
    assert message in str(raised.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        config_lib.load(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config_lib.load(listing)
