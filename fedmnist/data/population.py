"""`fedmnist describe` (also `python -m fedmnist.data describe`): what a federated population looks like.

Prints the number of clients, examples per client (min / median / max), and how skewed the clients'
labels are: the mean total-variation distance between each client's label distribution and the
whole population's (0 for identical mixes, 1 for disjoint labels), the mean number of distinct labels
per client and the mean share of each client's most common label. Writes a PNG of per-client label
histograms and of the examples-per-client distribution to `--output`, by default
`runs/population-<dataset>-<partition>-<timestamp>.png` (beside the runs, never over an earlier one).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np

from fedmnist import config as config_lib
from fedmnist.cli import ArgumentParser, UsageError


def label_counts(client_data, client_ids, num_classes: int) -> np.ndarray:
    """A (clients x classes) matrix of example counts."""
    counts = np.zeros((len(client_ids), num_classes), dtype=np.int64)
    for row, client_id in enumerate(client_ids):
        labels = client_data.create_tf_dataset_for_client(client_id).map(lambda e: e["label"])
        for label, count in zip(*np.unique(list(labels.as_numpy_iterator()), return_counts=True)):
            counts[row, label] = count
    return counts


def describe(counts: np.ndarray) -> dict:
    sizes = counts.sum(axis=1)
    client_mix = counts / sizes[:, None]
    overall = counts.sum(axis=0) / counts.sum()
    return {
        "clients": int(len(sizes)),
        "examples": int(sizes.sum()),
        "examples_min": int(sizes.min()),
        "examples_median": float(np.median(sizes)),
        "examples_max": int(sizes.max()),
        "label_tv_distance": float(0.5 * np.abs(client_mix - overall).sum(axis=1).mean()),
        "labels_per_client": float((counts > 0).sum(axis=1).mean()),
        "top_label_share": float(client_mix.max(axis=1).mean()),
    }


def format_description(name: str, stats: dict) -> str:
    return "\n".join([
        f"population: {name}",
        f"  clients            {stats['clients']}",
        f"  train examples     {stats['examples']} (per client: min {stats['examples_min']}, "
        f"median {stats['examples_median']:g}, max {stats['examples_max']})",
        f"  label skew         {stats['label_tv_distance']:.3f} mean total-variation distance to the "
        f"population's label mix (0 = IID)",
        f"  labels per client  {stats['labels_per_client']:.2f} on average; most common label holds "
        f"{stats['top_label_share']:.1%} of a client's examples",
    ])


def plot(counts: np.ndarray, path: Path, title: str, max_clients: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = counts[:max_clients]
    figure, (heat, sizes) = plt.subplots(1, 2, figsize=(12, 0.18 * len(shown) + 2.5),
                                         gridspec_kw={"width_ratios": [3, 1]})
    image = heat.imshow(shown / shown.sum(axis=1, keepdims=True), aspect="auto", cmap="viridis")
    heat.set(xlabel="label", ylabel="client", title=f"label share per client (first {len(shown)})")
    heat.yaxis.get_major_locator().set_params(integer=True)
    figure.colorbar(image, ax=heat, fraction=0.03)
    sizes.hist(counts.sum(axis=1), bins=min(30, len(counts)))
    sizes.set(xlabel="train examples per client", ylabel="clients", title="client sizes")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


RUNS_ROOT = Path("runs")
COMMAND = "describe"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m fedmnist.data {COMMAND}",
                            description="Describe the federated population a config selects: clients, examples "
                                        "per client, label skew, and a PNG of per-client label histograms.")
    parser.add_argument("--config", help="YAML config file (default: the tutorial's)")
    parser.add_argument("--dataset", help="auto, emnist, digits, synthetic or mnist")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set data.partition=shards")
    parser.add_argument("--output", type=Path, metavar="PNG",
                        help="where to write the label histograms (default: "
                             "runs/population-<dataset>-<partition>-<timestamp>.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser


def default_output(config) -> Path:
    """`runs/population-digits-iid-20261127-101500.png`: beside the runs, a new file every time."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"population-{config.data.dataset}-{config.data.partition}-{stamp}"
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        candidate = RUNS_ROOT / f"{base}{suffix}.png"
        if not candidate.exists():
            return candidate
    raise UsageError("too many descriptions this second; pass --output")


def output_path(requested: Path | None, overwrite: bool, config) -> Path:
    if requested is None:
        return default_output(config)
    if requested.suffix.lower() != ".png":
        raise UsageError(f"--output {requested}: give a .png file name")
    if requested.is_dir():
        raise UsageError(f"--output {requested} is a directory; give a file name")
    if requested.exists() and not overwrite:
        raise UsageError(f"--output {requested} exists; pass --overwrite or another --output")
    if not requested.parent.is_dir():
        raise UsageError(f"--output {requested}: directory {requested.parent} does not exist")
    return requested


def main(argv: list[str] | None = None) -> int:
    """`fedmnist describe ARGS`, or `python -m fedmnist.data describe ARGS` (argv from the command line)."""
    from_module = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [COMMAND]:
        argv = argv[1:]
    elif from_module and not set(argv[:1]) & {"-h", "--help"}:
        print(f"error: expected the command: python -m fedmnist.data {COMMAND} [options] (see --help)",
              file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        overrides = ([f"data.dataset={args.dataset}"] if args.dataset else []) + args.set
        config = config_lib.load(args.config, overrides)
        output = output_path(args.output, args.overwrite, config)
    except (UsageError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from fedmnist.data.sources import DataUnavailableError, load_dataset

    try:
        dataset = load_dataset(config.data, config.seed)
    except (DataUnavailableError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    counts = label_counts(dataset.train, dataset.train.client_ids, dataset.num_classes)
    name = dataset.name if dataset.partition is None else f"{dataset.name}, partition {dataset.partition}"
    print(format_description(name, describe(counts)))
    try:
        if output.parent == RUNS_ROOT:
            RUNS_ROOT.mkdir(exist_ok=True)
        plot(counts, output, name)
    except OSError as error:
        print(f"error: cannot write {output}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(f"label histograms: {output}")
    return 0
