"""Papers whose tables fedmnist reproduces: each module holds one paper's rows and published numbers."""
