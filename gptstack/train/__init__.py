"""Pretraining: the GPT-3 recipe (optim.py), the loop (loop.py), processes and parallelism (distributed.py)."""
