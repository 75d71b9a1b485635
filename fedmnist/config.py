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


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and the fix."""


def _range(minimum: float | None = None, *, above: float | None = None,
           maximum: float | None = None, below: float | None = None) -> dict:
    return {"min": minimum, "above": above, "max": maximum, "below": below}


def _field(default: Any, **bounds: float) -> Any:
    return dataclasses.field(default=default, metadata=_range(**bounds))


@dataclasses.dataclass
class DataConfig:
    dataset: Literal["auto", "emnist", "digits", "synthetic", "mnist"] = "auto"
    only_digits: bool = True
    cache_dir: Optional[str] = None
    allow_download: bool = True
    num_clients: int = _field(20, minimum=1)
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    dirichlet_alpha: float = _field(0.5, above=0)
    test_fraction: float = _field(0.2, above=0, below=1)
    examples_per_client: int = _field(50, minimum=2)
    max_clients: int = _field(0, minimum=0)
    max_examples_per_client: int = _field(0, minimum=0)


@dataclasses.dataclass
class PreprocessConfig:
    epochs: int = _field(5, minimum=1)
    # 0 = each batch is the client's whole dataset: McMahan et al.'s B = inf (FedSGD with epochs 1).
    batch_size: int = _field(20, minimum=0)
    shuffle_buffer: int = _field(100, minimum=1)
    prefetch_buffer: int = _field(10, minimum=1)
    shuffle_seed: int = _field(1, minimum=0)
    # per_round: a client's order changes every round, derived from (shuffle_seed, round, client);
    # fixed: one order per client for the whole run, as the article's rebuilt, seeded pipeline.
    shuffle: Literal["per_round", "fixed"] = "per_round"


@dataclasses.dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    learning_rate: float = _field(0.02, above=0)
    momentum: float = _field(0.0, minimum=0, below=1)
    beta_1: float = _field(0.9, minimum=0, below=1)
    beta_2: float = _field(0.999, minimum=0, below=1)
    epsilon: Optional[float] = _field(None, above=0)


@dataclasses.dataclass
class AvailabilityConfig:
    model: Literal["always", "daily"] = "always"
    night_charger_share: float = _field(0.6, minimum=0)
    daytime_share: float = _field(0.25, minimum=0)
    always_on_share: float = _field(0.15, minimum=0)
    round_minutes: int = _field(60, minimum=1)
    start_hour: int = _field(0, minimum=0, maximum=23)
    dropout: float = _field(0.0, minimum=0, below=1)
    min_clients: int = _field(1, minimum=1)


@dataclasses.dataclass
class PersonalizationConfig:
    enabled: bool = False
    epochs: int = _field(2, minimum=1)
    learning_rate: float = _field(0.02, above=0)
    batch_size: int = _field(20, minimum=1)
    clients: int = _field(0, minimum=0)


@dataclasses.dataclass
class SecureConfig:
    """`aggregation: secure`: Bonawitz et al.'s pairwise masking (fedmnist/privacy/secagg.py)."""
    dropout: float = _field(0.0, minimum=0, below=1)       # chance a client drops before sending its input
    dropout_after_input: float = _field(0.0, minimum=0, below=1)  # ... after sending it, before unmasking
    threshold: Optional[int] = _field(None, minimum=1)      # Shamir threshold t (>= 2); null = majority
    bits: int = _field(32, minimum=8, maximum=64)           # inputs are integers modulo 2^bits
    clip: float = _field(2.0, above=0)                      # L2 bound on each client's update
    # Bound on a client's weight (examples x epochs), which sizes the fixed-point range: null = the
    # largest client of the population; a client above an explicit bound is refused, never capped.
    max_client_weight: Optional[int] = _field(None, minimum=1)


@dataclasses.dataclass
class DPConfig:
    """`aggregation: dp`: tff.learning.dp_aggregator with adaptive clipping (fedmnist/privacy/accounting.py)."""
    noise_multiplier: float = _field(0.5, minimum=0)        # must stay below 0.1 x clients_per_round
    delta: Optional[float] = _field(None, above=0, below=1)  # null = 0.01 / num_clients
    # false: secret Poisson sampling (q = clients_per_round / num_clients), no client ids logged;
    # true: the seeded sample with ids logged, accounted with q = 1 (a public sample amplifies nothing)
    public_sample: bool = False


@dataclasses.dataclass
class SecureDpConfig:
    """`aggregation: secure_dp`: distributed DP, each client noising its quantized update, summed under the
    `secure:` protocol (its threshold and dropouts; not its bits and clip). fedmnist/privacy/distributed_dp.py."""
    mechanism: Literal["distributed_skellam", "distributed_dgauss"] = "distributed_skellam"
    # Central noise stddev / clip: what any `secure.threshold` surviving clients' noise shares add up to
    # (0 = no noise). Must not exceed clients_per_round: the mean's noise would exceed a whole update.
    noise_multiplier: float = _field(0.5, minimum=0)
    clip: float = _field(0.3, above=0)                      # L2 bound on each client's update
    # The secure sum is modulo 2^bits. At most 32: values are handled in float64 and int64, and a larger
    # modulus would let the noise outgrow numpy's Poisson sampler.
    bits: int = _field(16, minimum=2, maximum=32)    # the protocol masks in at least 2 bits
    modclip_prob: float = _field(1e-4, above=0, below=1)  # target chance of the sum wrapping (sizes the scale)
    delta: Optional[float] = _field(None, above=0, below=1)  # null = 0.01 / num_clients


@dataclasses.dataclass
class CompressionConfig:
    """`aggregation: compressed`: uniform quantization as tff.learning.compression_aggregator."""
    bits: int = _field(8, minimum=1, maximum=16)
    threshold: int = _field(20000, minimum=0)              # only tensors larger than this are quantized


# The aggregations whose model updates carry a differential-privacy guarantee.
DP_MODES = ("dp", "secure_dp")


@dataclasses.dataclass
class Config:
    name: str = "tutorial"
    seed: int = _field(0, minimum=0)
    rounds: int = _field(10, minimum=1)
    clients_per_round: int = _field(10, minimum=1)
    client_selection: Literal["fixed", "uniform"] = "fixed"
    eval_every: int = _field(0, minimum=0)
    eval_clients: int = _field(10, minimum=0)
    # The server evaluates the global model on the pooled test set with plain Keras (McMahan et al.'s
    # measure): null = never, 0 = after the last round, N = every N rounds and after the last.
    centralized_eval_every: Optional[int] = _field(None, minimum=0)
    # Test accuracies whose rounds-to-target summary.json and fedmnist.report give (McMahan et al.'s Table 2).
    accuracy_targets: list[float] = dataclasses.field(default_factory=lambda: [0.97, 0.99])
    histogram_every: int = _field(1, minimum=0)
    model: Literal["linear", "cnn", "2nn"] = "linear"
    checkpoint_every: int = _field(1, minimum=1)
    checkpoints_kept: int = _field(3, minimum=1)
    # How clients' data reaches TFF: "prepared" tensors built once (fast, same numbers; see
    # fedmnist/client_tensors.py) or "datasets", the article's tf.data pipelines rebuilt every round.
    client_input: Literal["prepared", "datasets"] = "prepared"
    num_workers: int = _field(1, minimum=1)  # local TFF workers the package starts; clients split across them
    workers: list[str] = dataclasses.field(default_factory=list)  # host:port of running workers instead
    # A worker that has not answered for this long is lost (it is probed every second, so a long round
    # on a responsive worker never trips it); a lost local worker is restarted up to `worker_retries`
    # times per run, repeating the round it interrupted.
    worker_timeout_seconds: float = _field(20.0, above=0)
    worker_retries: int = _field(2, minimum=0)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    client_optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    server_optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1.0))
    availability: AvailabilityConfig = dataclasses.field(default_factory=AvailabilityConfig)
    personalization: PersonalizationConfig = dataclasses.field(default_factory=PersonalizationConfig)
    aggregation: Literal["plain", "secure", "dp", "compressed", "secure_dp"] = "plain"
    secure: SecureConfig = dataclasses.field(default_factory=SecureConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)
    secure_dp: SecureDpConfig = dataclasses.field(default_factory=SecureDpConfig)


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
    if value is None or not bounds:
        return
    checks = [("min", lambda b: value >= b, "at least"), ("above", lambda b: value > b, "greater than"),
              ("max", lambda b: value <= b, "at most"), ("below", lambda b: value < b, "less than")]
    for name, holds, words in checks:
        bound = bounds.get(name)
        if bound is not None and not holds(bound):
            raise ConfigError(f"{key}: must be {words} {bound:g}, got {value!r}")


def _unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
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


def check_consistency(config: Config) -> None:
    """Rules that involve more than one key."""
    for i, address in enumerate(config.workers):
        check_address(f"workers[{i}]", address)
    if config.workers and config.num_workers != 1:
        raise ConfigError("num_workers: set it only for local workers; with workers listed, "
                          "each listed address is one worker")
    data = config.data
    if data.dataset in ("digits", "synthetic", "mnist") and config.clients_per_round > data.num_clients:
        raise ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                          f"{data.num_clients} clients of data.num_clients")
    shares = config.availability
    if shares.night_charger_share + shares.daytime_share + shares.always_on_share <= 0:
        raise ConfigError("availability: the archetype shares must not all be 0")
    if config.availability.min_clients > config.clients_per_round:
        raise ConfigError(f"availability.min_clients: {config.availability.min_clients} is more than "
                          f"clients_per_round ({config.clients_per_round})")
    if data.dataset == "digits" and data.num_clients > 1797 // 2:
        raise ConfigError(f"data.num_clients: digits has 1,797 examples, too few for "
                          f"{data.num_clients} clients (at most {1797 // 2})")
    if data.dataset == "mnist" and data.num_clients > 10000 // 2:
        raise ConfigError(f"data.num_clients: MNIST's 10,000 test images are dealt to the clients too, too few "
                          f"for {data.num_clients} clients (at most {10000 // 2})")
    check_targets(config.accuracy_targets)
    check_aggregation(config)


def check_targets(targets: list[float]) -> None:
    for i, target in enumerate(targets):
        if not 0 < target <= 1:
            raise ConfigError(f"accuracy_targets[{i}]: {target!r} is not an accuracy in (0, 1]")


def secure_threshold(config: Config) -> int:
    """The Shamir threshold: as configured, else a majority of the clients in a round."""
    return config.secure.threshold or config.clients_per_round // 2 + 1


def check_aggregation(config: Config) -> None:
    if config.aggregation == "dp" and config.client_selection == "fixed":
        raise ConfigError("aggregation: dp needs client_selection: uniform; with a fixed list of clients "
                          "there is no sampling to account the privacy spent for")
    if config.aggregation == "dp" and config.availability.model != "always":
        raise ConfigError(f"aggregation: dp needs availability.model: always; with "
                          f"{config.availability.model!r} availability a client's chance of taking part "
                          f"differs from the rate the privacy accountant uses")
    if config.aggregation == "dp" and config.dp.noise_multiplier >= 0.1 * config.clients_per_round:
        # dp_aggregator spends part of the budget on clip-norm estimation, with noise of standard
        # deviation 0.05 x clients_per_round; the rest must still reach the requested multiplier.
        raise ConfigError(f"dp.noise_multiplier: with {config.clients_per_round} clients per round "
                          f"tff.learning.dp_aggregator needs a noise multiplier below "
                          f"{0.1 * config.clients_per_round:g}; lower it or raise clients_per_round")
    if config.aggregation == "secure":
        check_secure(config)
    if config.aggregation == "secure_dp":
        check_secure_dp(config)


def check_secure_roster(config: Config) -> None:
    """Clients per round and threshold that the protocol can run with."""
    secure = config.secure
    if config.clients_per_round < 2:
        raise ConfigError(f"clients_per_round: aggregation: {config.aggregation} needs at least 2 clients per round; "
                          f"with {config.clients_per_round} the unmasked sum is that client's own update")
    if secure_threshold(config) < 2:
        raise ConfigError(f"secure.threshold: {secure.threshold} is too low: with a threshold of 1 every Shamir "
                          f"share is the secret itself; use at least 2 (null = a majority of clients_per_round)")
    if secure_threshold(config) > config.clients_per_round:
        raise ConfigError(f"secure.threshold: {secure.threshold} is more than the "
                          f"{config.clients_per_round} clients per round")


def check_secure(config: Config) -> None:
    secure = config.secure
    check_secure_roster(config)
    # Without an explicit bound the weights are known only once the data is loaded
    # (`secure_weight_bound`); weight 1 is the most room they can leave.
    if secure.max_client_weight:
        check_secure_precision(secure, config.clients_per_round, secure.max_client_weight,
                               "raise secure.bits or lower secure.max_client_weight")
    else:
        check_secure_precision(secure, config.clients_per_round, 1, "raise secure.bits", " (the smallest possible)")


def check_secure_dp(config: Config) -> None:
    """The protocol's roster, a sum that cannot wrap (TFF's DistributedDpSumFactory conditions) and noise
    that still means something. The scale, which needs the model's size, is checked when the process is
    built (fedmnist/privacy/distributed_dp.py)."""
    from fedmnist.privacy.distributed_dp import clip_prob_to_num_stddevs  # numpy and scipy, no TensorFlow

    check_secure_roster(config)
    ddp, clients = config.secure_dp, config.clients_per_round
    if 2 ** ddp.bits < clients:
        raise ConfigError(f"secure_dp.bits: 2^{ddp.bits} is less than the {clients} clients per round, so their "
                          f"sum wraps; raise secure_dp.bits")
    if 2 ** (2 * ddp.bits) < clients * clip_prob_to_num_stddevs(ddp.modclip_prob) ** 2:
        raise ConfigError(f"secure_dp.bits: {ddp.bits} bits are too few for {clients} clients at "
                          f"secure_dp.modclip_prob {ddp.modclip_prob:g}; raise secure_dp.bits or secure_dp.modclip_prob")
    if ddp.noise_multiplier > clients:
        raise ConfigError(f"secure_dp.noise_multiplier: {ddp.noise_multiplier:g} is more than the {clients} clients "
                          f"per round: the mean's noise per weight would exceed a whole clipped update; lower it")


def check_secure_precision(secure: SecureConfig, clients_per_round: int, max_weight: int, fix: str,
                           detail: str = "") -> None:
    """ConfigError when `clients_per_round` weights up to `max_weight` leave less than
    MIN_PRECISION_BITS of resolution at the clipping bound (or could wrap the sum)."""
    from fedmnist.privacy import secagg  # numpy and cryptography only

    scale = secagg.fixed_point_scale(secure.bits, secure.clip, max_weight, clients_per_round)
    if secagg.precision_bits(secure.clip, scale) < secagg.MIN_PRECISION_BITS:
        raise ConfigError(f"secure.bits: {secure.bits} bits leave too little precision for "
                          f"{clients_per_round} clients with weights up to {max_weight}{detail} and clip "
                          f"{secure.clip:g}; {fix}")


def secure_weight_bound(secure: SecureConfig, clients_per_round: int, largest_weight: int | None) -> int:
    """The bound on a client's weight that sizes the fixed-point range: `secure.max_client_weight`,
    else `largest_weight`, the population's largest client weight (examples x epochs). A client
    above an explicit bound is a ConfigError: capping its weight would silently change the mean."""
    if secure.max_client_weight is None and largest_weight is None:
        raise ValueError("secure.max_client_weight is null: pass the population's largest client weight")
    bound = secure.max_client_weight or max(largest_weight, 1)
    if largest_weight is not None and largest_weight > bound:
        raise ConfigError(f"secure.max_client_weight: a client has weight {largest_weight} (examples x "
                          f"preprocess.epochs), more than {bound}; raise it, or set it to null to use the "
                          f"largest client's weight")
    if secure.max_client_weight:
        check_secure_precision(secure, clients_per_round, bound, "raise secure.bits or lower secure.max_client_weight")
    else:
        check_secure_precision(secure, clients_per_round, bound, "raise secure.bits or lower preprocess.epochs or "
                               "data.max_examples_per_client", " (the largest client's examples x epochs)")
    return bound


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
    config = from_dict(values)
    check_consistency(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
