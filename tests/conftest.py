"""Shared test configuration: the cluster fixtures live in kubetune's own pytest plugin, the
operator and claim fixtures in ``tests/fixtures.py``."""

pytest_plugins = ["kubetune.localcluster.pytest_plugin", "tests.fixtures"]
