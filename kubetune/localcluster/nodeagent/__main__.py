"""``python -m kubetune.localcluster.nodeagent CONFIG.json``: run one node agent until SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from kubetune.localcluster.nodeagent.agent import NodeAgent


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    agent = NodeAgent(json.loads(Path(sys.argv[1]).read_text()))

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
