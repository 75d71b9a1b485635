"""How the server combines client updates (`aggregation:` in the config): one registered class per mode.

`plain` and `compressed` live here; the modes that are about privacy (`dp`, `secure`, `secure_dp`) live
in `fedmnist/privacy/`. Each is an `AggregationMode` (base.py), listed in fedmnist/registry.py.
"""
