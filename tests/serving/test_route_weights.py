"""Weighted routes split real traffic in proportion to their weights.

Aspects:
- 1,000 completions sent to a route over two adapters weighted 90/10 are served (the
  ``x-kubetune-adapter`` header) by each adapter within 5 standard deviations of the weights (a
  binomial count), and a route replaced through the admin API to 50/50 follows the new weights.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import PROMPT, ServeFactory

pytestmark = pytest.mark.torch

REQUESTS = 1000


def _served_by(url: str, route: str) -> Counter[str]:
    body = {"model": route, "prompt": PROMPT, "max_tokens": 1}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post(f"{url}/v1/completions", json=body), range(REQUESTS)))
    assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    return Counter(a.headers["x-kubetune-adapter"] for a in answers)


def _within(count: int, share: float) -> bool:
    expected, sd = REQUESTS * share, math.sqrt(REQUESTS * share * (1 - share))
    return abs(count - expected) <= 5 * sd


def test_route_weights_hold_over_1000_requests(artifacts: dict[str, Path], serve: ServeFactory) -> None:
    url = serve(
        "--model",
        str(artifacts["base"]),
        "--adapter",
        f"stable={artifacts['lora-a']}",
        "--adapter",
        f"canary={artifacts['lora-b']}",
        "--route",
        "support=stable:90,canary:10",
    )
    counts = _served_by(url, "support")
    assert sum(counts.values()) == REQUESTS
    assert _within(counts["canary"], 0.1) and _within(counts["stable"], 0.9), counts

    routes = {
        "routes": [
            {
                "name": "support",
                "backends": [{"adapter": "stable", "weight": 1}, {"adapter": "canary", "weight": 1}],
            }
        ]
    }
    httpx.put(f"{url}/v1/routes", json=routes, timeout=10).raise_for_status()
    counts = _served_by(url, "support")
    assert _within(counts["canary"], 0.5), counts
