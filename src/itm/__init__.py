"""itm: fine-grained image-text matching under one roof."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("itm")  # the installed distribution's version (pyproject.toml)
except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
    __version__ = "0+unknown"
