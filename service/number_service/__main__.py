"""``python -m number_service``: the same as the ``number-service`` command."""

from .cli import run

run()
