"""Training algorithms (`algorithm:` in the config): one registered class per algorithm (fedmnist/registry.py).

Each is an `Algorithm` (base.py): its config section, its checks, its defaults, and how TFF builds it on the
article's datasets; on prepared client tensors the client work is fedmnist's (fedmnist/client_tensors.py).
"""
