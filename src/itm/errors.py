"""Errors a user can fix without reading a traceback, and the optional-dependency check.

The command-line entry points (:mod:`itm.cli`) print these as one line (no traceback; set
``HYDRA_FULL_ERROR=1`` to see it).
"""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtraError", "UserError", "extra_available", "require_extra"]


class UserError(Exception):
    """A problem with the user's configuration, environment or inputs (not a bug in itm)."""


class MissingExtraError(UserError, ImportError):
    """An optional part of itm is used but its extra is not installed."""


def extra_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing / a broken install
        return False


def require_extra(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` (``"<feature> needs ... pip install 'itm[<extra>]'"``)
    unless ``module`` is importable."""
    if not extra_available(module):
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'itm[{extra}]'"
        )
