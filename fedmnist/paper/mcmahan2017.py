"""McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017, arXiv 1602.05629): the MNIST rows of its Table 2 that `configs/mcmahan2017/` runs.

Table 2 gives the communication rounds FedSGD and FedAvg need to reach a target test accuracy (97% for the
2NN, 99% for the CNN) on MNIST with 100 clients, C = 0.1, each row at its best client learning rate; u = E n / B
is the expected number of local updates per round (n = 600 examples per client). Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses

PAPER = "McMahan et al. 2017, Table 2 (arXiv 1602.05629)"
EXAMPLES_PER_CLIENT = 600  # 60,000 training images over 100 clients


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 2 as a config in `configs/mcmahan2017/<name>.yaml`."""

    name: str
    model: str  # "CNN" or "2NN"
    epochs: int  # E
    batch_size: int | None  # B; None = inf (each client's whole data in one batch: FedSGD when E = 1)
    iid: bool
    paper_rounds: int  # Table 2's rounds to `target` (IID or pathological non-IID column)

    @property
    def target(self) -> float:
        return 0.99 if self.model == "CNN" else 0.97

    @property
    def method(self) -> str:
        return "FedSGD" if self.batch_size is None and self.epochs == 1 else "FedAvg"

    @property
    def updates(self) -> int:
        """u = E n / B, local updates per round (1 per epoch with B = inf)."""
        return self.epochs * (1 if self.batch_size is None else EXAMPLES_PER_CLIENT // self.batch_size)

    def describe(self) -> str:
        batch = "inf" if self.batch_size is None else self.batch_size
        data = "IID" if self.iid else "non-IID"
        return f"{self.model} {self.method} E={self.epochs} B={batch} u={self.updates} {data}"


# Table 2 of arXiv 1602.05629 (v3, the AISTATS version), MNIST part: rounds to 99% (CNN) and 97% (2NN),
# IID / pathological non-IID. CNN: FedSGD (E=1, B=inf, u=1) 626 / 483; FedAvg E=1 B=10 (u=60) 34 / 350;
# E=5 B=10 (u=300) 20 / 229; E=20 B=10 (u=1200) 18 / 173. 2NN: FedSGD 1468 / 1817; FedAvg E=1 B=10 (u=60)
# 92 / 831. (1455 is Table 1's 2NN B=inf figure for C = 0, one client per round, not Table 2's C = 0.1.)
ROWS: dict[str, Row] = {row.name: row for row in (
    Row("cnn-fedsgd-iid", "CNN", 1, None, True, 626),
    Row("cnn-fedsgd-noniid", "CNN", 1, None, False, 483),
    Row("cnn-fedavg-e1-b10-iid", "CNN", 1, 10, True, 34),
    Row("cnn-fedavg-e1-b10-noniid", "CNN", 1, 10, False, 350),
    Row("cnn-fedavg-e5-b10-iid", "CNN", 5, 10, True, 20),
    Row("cnn-fedavg-e5-b10-noniid", "CNN", 5, 10, False, 229),
    Row("cnn-fedavg-e20-b10-iid", "CNN", 20, 10, True, 18),
    Row("cnn-fedavg-e20-b10-noniid", "CNN", 20, 10, False, 173),
    Row("2nn-fedsgd-iid", "2NN", 1, None, True, 1468),
    Row("2nn-fedavg-e1-b10-iid", "2NN", 1, 10, True, 92),
)}
