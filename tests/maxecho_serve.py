"""Serve MaxEcho with the serving layer's ``serve()`` and its options, as someone's own
command would.

    python tests/maxecho_serve.py --port 0 --metrics-port 0 --grace 5 [SERVE OPTIONS]

takes every serve option of ``serving/options.py`` but ``--workers`` (this command runs
no supervisor), each also read from ``MAXECHO_<OPTION>``; listens where they say, both
addresses named in its log lines on stderr, until SIGINT or SIGTERM; then drains for
``--grace`` seconds and exits 0. Nothing of NumberService is involved but the serving
layer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gen")]  # maxecho_service, maxecho_gen

from maxecho_service import MaxEcho  # noqa: E402

from number_service.serving import ServeConfig, options, serve  # noqa: E402
from number_service.serving.logs import configure  # noqa: E402

ENV_PREFIX = "MAXECHO_"


@click.command(context_settings={"show_default": True})
@options.serve_options(ENV_PREFIX, exclude=["workers"])
def main(**values: Any) -> None:
    """Serve MaxEcho until SIGTERM or SIGINT, then drain and exit 0."""
    json = values["log_format"].lower() == "json"
    configure(values["log_level"], "json" if json else "text")
    config = options.serve_config(values, ServeConfig(name="maxecho"))
    asyncio.run(serve(lambda: [MaxEcho()], config))


if __name__ == "__main__":
    main()
