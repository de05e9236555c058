"""itm: fine-grained image-text matching under one roof."""

__version__ = "0.1.0"
