"""Shared test configuration: the cluster fixtures live in kubetune's own pytest plugin."""

pytest_plugins = ["kubetune.localcluster.pytest_plugin"]
