"""How the server combines client updates, and what that protects: `aggregation` in the config.

- `aggregation`: builds the training process for a mode and reports each round's cost and privacy.
- `secure_process`, `secagg`, `shamir`: secure aggregation (Bonawitz et al. 2017) driving FedAvg.
- `accounting`: the privacy spent by `dp` (`dp_accounting`).
- `distributed_dp`, `distributed_accounting`: `secure_dp`, distributed DP (clients' noise shares) under
  secure aggregation, and its privacy spent.
- `compression`: TFF's quantizing aggregator and the bits it really sends.
"""
