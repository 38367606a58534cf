"""Two small helpers shared across the package, with no ring_jax imports (the bottom of the import order)."""

from __future__ import annotations

from absl import logging
from flax import nnx

_logged: set[str] = set()


def log_once(msg: str, level: int = logging.WARNING) -> None:
    """Log ``msg`` with absl at ``level`` (``absl.logging.INFO``, ``WARNING``, ...) the first time this process
    sees it; later calls with the same text log nothing."""
    if msg not in _logged:
        _logged.add(msg)
        logging.log(level, msg)


def is_variable(x: object) -> bool:
    """Whether ``x`` is an ``nnx.Variable`` (a parameter and its metadata): the ``is_leaf`` that stops tree maps over
    an nnx State at the Variables."""
    return isinstance(x, nnx.Variable)
