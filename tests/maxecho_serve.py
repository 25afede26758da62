"""Serve MaxEcho with the serving layer's ``serve()``, as someone's own command would.

    python tests/maxecho_serve.py GRACE

listens on 127.0.0.1 (a free port) with a metrics endpoint (another free port), both
named in its log lines on stderr, until SIGINT or SIGTERM; then drains for GRACE
seconds and exits 0. Nothing of NumberService is involved but the serving layer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gen")]  # maxecho_service, maxecho_gen

from maxecho_service import MaxEcho  # noqa: E402

from number_service.serving import ServeConfig, serve  # noqa: E402
from number_service.serving.logs import configure  # noqa: E402


def main() -> None:
    configure("info")
    config = ServeConfig(port=0, metrics_port=0, grace=float(sys.argv[1]), name="maxecho")
    asyncio.run(serve(lambda: [MaxEcho()], config))


if __name__ == "__main__":
    main()
