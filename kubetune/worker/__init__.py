"""The training and serving runtime. ``kubetune.worker.plan`` is importable without torch."""
