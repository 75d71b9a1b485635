"""McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS 2017, arXiv 1602.05629): the MNIST rows that `configs/mcmahan2017/` runs.

Table 2 (the CNN, 99%) and Table 1 (the 2NN, 97%, its C = 0.1 row) give the communication rounds FedSGD
and FedAvg need to reach a target test accuracy on MNIST with 100 clients, C = 0.1, each row at its best client
learning rate; u = E n / B is the expected number of local updates per round (n = 600 examples per client).
Kept free of TensorFlow.
"""

from __future__ import annotations

import dataclasses

PAPER = "McMahan et al. 2017 (arXiv 1602.05629), Tables 1 and 2"
EXAMPLES_PER_CLIENT = 600  # 60,000 training images over 100 clients


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper's tables as a config in `configs/mcmahan2017/<name>.yaml`."""

    name: str
    model: str  # "CNN" or "2NN"
    epochs: int  # E
    batch_size: int | None  # B; None = inf (each client's whole data in one batch: FedSGD when E = 1)
    iid: bool
    paper_rounds: int  # the paper's rounds to `target` (IID or pathological non-IID column)

    @property
    def target(self) -> float:
        return 0.99 if self.model == "CNN" else 0.97

    @property
    def table(self) -> str:
        """Where the paper gives `paper_rounds`."""
        return "Table 2" if self.model == "CNN" else "Table 1"

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


# arXiv 1602.05629, rounds to target, IID / pathological non-IID. Table 2, the CNN (99%): FedSGD (E=1, B=inf,
# u=1) 626 / 483; FedAvg E=1 B=10 (u=60) 34 / 350; E=5 B=10 (u=300) 20 / 229; E=20 B=10 (u=1200) 18 / 173.
# Table 1, the 2NN with E=1 (97%), C = 0.1: B=inf (FedSGD) 1474 / 1796; B=10 (u=60) 87 / 664. (Appendix A's
# Table 4 has 2NN rows too; its figures could not be read here: docs/mcmahan2017.md.)
ROWS: dict[str, Row] = {row.name: row for row in (
    Row("cnn-fedsgd-iid", "CNN", 1, None, True, 626),
    Row("cnn-fedsgd-noniid", "CNN", 1, None, False, 483),
    Row("cnn-fedavg-e1-b10-iid", "CNN", 1, 10, True, 34),
    Row("cnn-fedavg-e1-b10-noniid", "CNN", 1, 10, False, 350),
    Row("cnn-fedavg-e5-b10-iid", "CNN", 5, 10, True, 20),
    Row("cnn-fedavg-e5-b10-noniid", "CNN", 5, 10, False, 229),
    Row("cnn-fedavg-e20-b10-iid", "CNN", 20, 10, True, 18),
    Row("cnn-fedavg-e20-b10-noniid", "CNN", 20, 10, False, 173),
    Row("2nn-fedsgd-iid", "2NN", 1, None, True, 1474),
    Row("2nn-fedavg-e1-b10-iid", "2NN", 1, 10, True, 87),
)}
