"""Shared test configuration: the cluster fixtures live in kubetune's own pytest plugin, the
operator and claim fixtures in ``tests/fixtures.py``.

``make test`` runs the suite on pytest-xdist workers (``--dist loadgroup``). Each worker starts its
own session cluster on first use. The e2e tests share one group, so a single worker starts the
podman-runtime cluster they need instead of every worker starting one; so do the tests that use
the Kueue cluster.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["kubetune.localcluster.pytest_plugin", "tests.fixtures"]

#: Test directories whose tests run on one xdist worker, because they share an expensive session
#: fixture that only they use.
_GROUPED_DIRS = {"e2e": "podman-cluster"}
#: The same for session fixtures used across directories.
_GROUPED_FIXTURES = {"kueue_cluster": "kueue-cluster"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.nodeid.split("/")
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in _GROUPED_DIRS:
            item.add_marker(pytest.mark.xdist_group(_GROUPED_DIRS[parts[1]]))
            continue
        for fixture, group in _GROUPED_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break

    # xdist hands tests out in collection order: the long ones go first so none of them starts
    # last and leaves the other workers idle at the end.
    items.sort(
        key=lambda item: (
            0 if item.get_closest_marker("xdist_group") else 1 if item.get_closest_marker("slow") else 2
        )
    )
