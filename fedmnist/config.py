"""The run configuration: one typed schema, YAML files, `--set key=value` overrides.

Everything a user types is checked here, before TensorFlow starts: unknown keys (with a
"did you mean"), types, choices (`Literal`) and ranges (field metadata). The defaults are the
tutorial's settings, so `configs/tutorial.yaml` and `Config()` describe the same run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fedmnist import machine, registry
from fedmnist.errors import ConfigError, PlanTooLargeError
from fedmnist.schema import setting

INT32_MAX = 2**31 - 1  # TensorFlow's sizes and batch dimensions


def _choice(default: str, choices: registry.Registry) -> Any:
    """A setting naming a registered component: `choices` lists the names and their classes."""
    return dataclasses.field(default=default, metadata={"choices": choices})


@dataclasses.dataclass
class DataConfig:
    dataset: str = _choice("auto", registry.SOURCES)
    only_digits: bool = True
    cache_dir: Optional[str] = None
    allow_download: bool = True
    num_clients: int = setting(20, minimum=1)
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    dirichlet_alpha: float = setting(0.5, above=0)
    test_fraction: float = setting(0.2, above=0, below=1)
    examples_per_client: int = setting(50, minimum=2)
    max_clients: int = setting(0, minimum=0)
    max_examples_per_client: int = setting(0, minimum=0)
    # mnist only: "emnist" gives every source's convention (1.0 = background); "mnist" keeps MNIST's
    # (0.0 = background, pixels / 255), as McMahan et al. 2017 trained on it.
    mnist_pixels: Literal["emnist", "mnist"] = "emnist"


@dataclasses.dataclass
class PreprocessConfig:
    epochs: int = setting(5, minimum=1)
    # 0 = each batch is the client's whole dataset: McMahan et al.'s B = inf (FedSGD with epochs 1).
    batch_size: int = setting(20, minimum=0, maximum=INT32_MAX)
    # tf.data's shuffle reserves its whole buffer when it starts (`check_plan_memory`).
    shuffle_buffer: int = setting(100, minimum=1, maximum=INT32_MAX)
    prefetch_buffer: int = setting(10, minimum=1, maximum=INT32_MAX)
    shuffle_seed: int = setting(1, minimum=0, maximum=2**63 - 1)  # tf.data's int64 seed
    # per_round: a client's order changes every round, derived from (shuffle_seed, round, client);
    # fixed: one order per client for the whole run, as the article's rebuilt, seeded pipeline.
    shuffle: Literal["per_round", "fixed"] = "per_round"


@dataclasses.dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    learning_rate: float = setting(0.02, above=0)
    momentum: float = setting(0.0, minimum=0, below=1)
    beta_1: float = setting(0.9, minimum=0, below=1)
    beta_2: float = setting(0.999, minimum=0, below=1)
    epsilon: Optional[float] = setting(None, above=0)


@dataclasses.dataclass
class AvailabilityConfig:
    model: Literal["always", "daily"] = "always"
    night_charger_share: float = setting(0.6, minimum=0)
    daytime_share: float = setting(0.25, minimum=0)
    always_on_share: float = setting(0.15, minimum=0)
    round_minutes: int = setting(60, minimum=1)
    start_hour: int = setting(0, minimum=0, maximum=23)
    dropout: float = setting(0.0, minimum=0, below=1)
    min_clients: int = setting(1, minimum=1)


@dataclasses.dataclass
class PersonalizationConfig:
    enabled: bool = False
    epochs: int = setting(2, minimum=1, maximum=INT32_MAX)  # a tf.range loop in the graph
    learning_rate: float = setting(0.02, above=0)
    batch_size: int = setting(20, minimum=1, maximum=INT32_MAX)
    clients: int = setting(0, minimum=0)


@dataclasses.dataclass
class CoreConfig:
    """The settings every run has; `Config` adds the sections that registered components declare."""

    name: str = "tutorial"
    seed: int = setting(0, minimum=0, maximum=2**32 - 1)  # numpy's and TensorFlow's seed range
    rounds: int = setting(10, minimum=1)
    clients_per_round: int = setting(10, minimum=1)
    client_selection: Literal["fixed", "uniform"] = "fixed"
    eval_every: int = setting(2, minimum=0)
    eval_clients: int = setting(10, minimum=0)
    # The server evaluates the global model on the pooled test set with plain Keras (McMahan et al.'s
    # measure): null = never, 0 = after the last round, N = every N rounds and after the last.
    centralized_eval_every: Optional[int] = setting(None, minimum=0)
    # Test accuracies whose rounds-to-target summary.json and fedmnist.report give (McMahan et al.'s Table 2).
    accuracy_targets: list[float] = dataclasses.field(default_factory=list)
    # Stop this many rounds after the best test accuracy first reaches the highest accuracy target (null =
    # play every round). Rounds to target stay exact: they depend only on the rounds up to the crossing.
    stop_after_target: Optional[int] = setting(None, minimum=0)
    histogram_every: int = setting(1, minimum=0)
    # linear (the article's), cnn or 2nn (McMahan et al.'s), or your own: "package.module:function", a
    # function of num_classes returning an uncompiled Keras model for 784 inputs (fedmnist/model.py).
    model: str = "linear"
    checkpoint_every: int = setting(1, minimum=1)
    checkpoints_kept: int = setting(3, minimum=1)
    # How clients' data reaches TFF: "prepared" tensors built once (fast, same numbers; see
    # fedmnist/client_tensors.py) or "datasets", the article's tf.data pipelines rebuilt every round.
    client_input: Literal["prepared", "datasets"] = "prepared"
    num_workers: int = setting(1, minimum=1)  # local TFF workers the package starts; clients split across them
    workers: list[str] = dataclasses.field(default_factory=list)  # host:port of running workers instead
    # A worker that has not answered for this long is lost (it is probed every second, so a long round
    # on a responsive worker never trips it); a lost local worker is restarted up to `worker_retries`
    # times per run, repeating the round it interrupted.
    worker_timeout_seconds: float = setting(20.0, above=0)
    worker_retries: int = setting(2, minimum=0)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    client_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    server_optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1.0))
    availability: AvailabilityConfig = dataclasses.field(default_factory=AvailabilityConfig)
    personalization: PersonalizationConfig = dataclasses.field(default_factory=PersonalizationConfig)
    aggregation: str = _choice("plain", registry.AGGREGATIONS)
    algorithm: str = _choice("fedavg", registry.ALGORITHMS)


def _component_sections() -> list[tuple[str, type, Any]]:
    """The config sections that registered components declare (`section`, `Settings`), e.g. `dp:`."""
    sections = {}
    for component in registry.AGGREGATIONS.classes() + registry.ALGORITHMS.classes():
        if component.section and component.section not in sections:
            sections[component.section] = component.Settings
    return [(name, settings, dataclasses.field(default_factory=settings)) for name, settings in sections.items()]


Config = dataclasses.make_dataclass("Config", _component_sections(), bases=(CoreConfig,))
Config.__module__ = __name__
Config.__doc__ = """A run's whole configuration: `CoreConfig` and one section per component that declares one."""


# --- Building a Config from plain data ---------------------------------------------------------

def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _check_value(key: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if value is None else _check_value(key, options[0], value)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(kind)}")
        return value
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", item_kind, item) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return from_dict(value, kind, prefix=f"{key}.")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        value = _parse_float(key, value)  # YAML 1.1 reads `1e-3` as a string.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None


def _check_range(key: str, value: Any, bounds: dict) -> None:
    if "choices" in bounds:
        bounds["choices"].get(value)  # a ConfigError naming the choices when `value` is not one
        return
    if value is None or not bounds:
        return
    checks = [("min", lambda b: value >= b, "at least"), ("above", lambda b: value > b, "greater than"),
              ("max", lambda b: value <= b, "at most"), ("below", lambda b: value < b, "less than")]
    for name, holds, words in checks:
        bound = bounds.get(name)
        if bound is not None and not holds(bound):
            raise ConfigError(f"{key}: must be {words} {bound if isinstance(bound, int) else format(bound, 'g')}, got {value!r}")


def _unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    """The error for `prefix + key`, where `known` are the keys beside it, with a "did you mean" that also
    searches every section: `learning_rate` -> 'client_optimizer.learning_rate' (and the other sections that
    have one), `data.rounds` -> 'rounds', `roundz` -> 'rounds'."""

    def dotted(cls: type, path: str = "") -> list[str]:
        hints = typing.get_type_hints(cls)
        keys = []
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                keys += dotted(hints[field.name], f"{path}{field.name}.")
            else:
                keys.append(f"{path}{field.name}")
        return keys

    everywhere = [k for k in dotted(Config) if not k.startswith(prefix) or "." in k[len(prefix):]]
    leaf = {k: k.rsplit(".", 1)[-1] for k in everywhere}
    suggestions = [k for k in everywhere if leaf[k] == key]  # the same setting in another section
    if not suggestions:
        suggestions = [prefix + close for close in difflib.get_close_matches(key, known, n=1)]
    if not suggestions:
        near = difflib.get_close_matches(key, sorted(set(leaf.values())), n=1)
        suggestions = [k for k in everywhere if near and leaf[k] == near[0]]
    if not suggestions and key:
        suggestions = [prefix + k for k in known if k.startswith(key)][:1]  # `noise` -> noise_multiplier
    if suggestions:
        quoted = [f"'{k}'" for k in suggestions]
        choices = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        hint = f" (did you mean {choices}?)"
    else:
        hint = f" (known keys: {', '.join(known)})"
    return ConfigError(f"unknown key '{prefix}{key}'{hint}")


def from_dict(values: dict, cls: type = Config, prefix: str = "") -> Any:
    """Builds and validates `cls` from a mapping, naming the first problem it finds."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise _unknown_key(str(key), prefix, list(fields))
    kwargs = {}
    for name, value in values.items():
        checked = _check_value(prefix + name, hints[name], value)
        _check_range(prefix + name, checked, dict(fields[name].metadata))
        kwargs[name] = checked
    return cls(**kwargs)


def check_address(key: str, address: str) -> None:
    """`host:port` with a port in 1..65535 (IPv6 hosts in brackets: `[::1]:8000`)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {address!r} is not host:port (e.g. localhost:8000)")


MAX_NAME_BYTES = 200


def check_consistency(config: Config) -> None:
    """Rules that involve more than one key: the core ones here, then each chosen component's own."""
    # A run's directory is runs/<name>-<time>: a name with a separator would put it elsewhere (issue 27),
    # and one longer than a file name may be (255 bytes, less the time) could not be created.
    if not config.name or not config.name.isprintable() or any(c in config.name for c in "/\\") \
            or config.name in (".", "..") or len(config.name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"name: {config.name!r} is not a run name (printable, without / or \\, at most "
                          f"{MAX_NAME_BYTES} bytes); to put a run elsewhere than runs/, pass --run-dir")
    for i, address in enumerate(config.workers):
        check_address(f"workers[{i}]", address)
    if config.workers and config.num_workers != 1:
        raise ConfigError("num_workers: set it only for local workers; with workers listed, "
                          "each listed address is one worker")
    shares = config.availability
    if shares.night_charger_share + shares.daytime_share + shares.always_on_share <= 0:
        raise ConfigError("availability: the archetype shares must not all be 0")
    if config.availability.min_clients > config.clients_per_round:
        raise ConfigError(f"availability.min_clients: {config.availability.min_clients} is more than "
                          f"clients_per_round ({config.clients_per_round})")
    check_targets(config.accuracy_targets)
    if config.stop_after_target is not None and not config.accuracy_targets:
        raise ConfigError("stop_after_target: set accuracy_targets too (it stops after the highest one)")
    check_model_name(config.model)
    check_plan_memory(config)
    registry.SOURCES.get(config.data.dataset).check(config)
    registry.ALGORITHMS.get(config.algorithm).check(config)
    registry.AGGREGATIONS.get(config.aggregation).check(config)


# Memory that settings reserve whatever the data holds (measured in docs/runs.md, "Limits").
SHUFFLE_SLOT_BYTES = 24       # a slot of tf.data's shuffle buffer, reserved when the pipeline starts
LOCAL_WORKER_BYTES = 250e6    # a local TFF worker training a round's clients


def check_plan_memory(config: Config) -> None:
    """PlanTooLargeError when the memory that `num_workers`, or with `client_input: datasets` the shuffle
    buffers, reserve up front would exceed this machine's. TFF's worker runs a round's pipelines, or an
    evaluation's, at once (`eval_clients: 0` evaluates every client); prepared clients' orders are drawn with
    buffers no larger than a client's stream (`client_tensors.shuffle_order`)."""
    memory, buffer = machine.memory_bytes(), config.preprocess.shuffle_buffer
    if config.client_input == "datasets":
        pipelines = max(config.clients_per_round, config.eval_clients or config.data.num_clients)
        shuffle = SHUFFLE_SLOT_BYTES * buffer * pipelines
        if shuffle > memory:
            raise PlanTooLargeError(f"preprocess.shuffle_buffer: {pipelines} shuffle buffers of {buffer:,} examples "
                                    f"need {machine.gigabytes(shuffle)} GB, more than this machine's "
                                    f"{machine.gigabytes(memory)} GB; lower it (a buffer as large as a client's "
                                    f"examples times preprocess.epochs already shuffles them all)")
    workers = LOCAL_WORKER_BYTES * config.num_workers
    if workers > memory:
        raise PlanTooLargeError(f"num_workers: {config.num_workers:,} local TFF workers need about "
                                f"{machine.gigabytes(workers)} GB, more than this machine's "
                                f"{machine.gigabytes(memory)} GB; at most {int(memory // LOCAL_WORKER_BYTES)} fit")


BUILT_IN_MODELS = ("linear", "cnn", "2nn")


def check_model_name(name: str) -> None:
    """A built-in model, or `module:function` whose module can be found (imported, and the function checked,
    when the run is built)."""
    import importlib.util

    if name in BUILT_IN_MODELS:
        return
    module, sep, function = name.partition(":")
    if not sep or not module or not function.isidentifier():
        close = difflib.get_close_matches(name, BUILT_IN_MODELS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"model: {name!r} is not {', '.join(BUILT_IN_MODELS)} or module:function ({hint}"
                          f"e.g. mypackage.models:create_model)")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"model: cannot import {module!r} (from {name!r}); is it on the Python path, e.g. "
                          f"installed or in the current directory?")


def check_targets(targets: list[float]) -> None:
    for i, target in enumerate(targets):
        if not 0 < target <= 1:
            raise ConfigError(f"accuracy_targets[{i}]: {target!r} is not an accuracy in (0, 1]")


# --- Files and overrides --------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def apply_override(values: dict, assignment: str) -> None:
    """Applies one `dotted.key=value` (value parsed as YAML) to a nested mapping in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set client_optimizer.learning_rate=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML") from None
    *parents, leaf = key.strip().split(".")
    node = values
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a group of settings")
        node = child
    node[leaf] = value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config from `path` (or the defaults) with `overrides` applied, validated."""
    values = read_yaml(path) if path else {}
    for assignment in overrides:
        apply_override(values, assignment)
    apply_defaults(values)
    config = from_dict(values)
    check_consistency(config)
    return config


def apply_defaults(values: dict) -> None:
    """The chosen algorithm's defaults (`defaults`: dotted key -> value) for the keys `values` leaves unset:
    `algorithm: fedsgd` means one epoch of full-batch steps unless the config says otherwise."""
    algorithm = values.get("algorithm", CoreConfig.algorithm)
    if not isinstance(algorithm, str):
        return  # from_dict names the problem
    for dotted, value in registry.ALGORITHMS.get(algorithm).defaults.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return  # from_dict names the problem
        node.setdefault(leaf, value)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
