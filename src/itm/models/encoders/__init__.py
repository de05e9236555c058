"""Image and text encoders: ``enc(x, lengths) -> [B, N, d]`` fragment embeddings."""

from itm.models.encoders.image import FCImageEncoder
from itm.models.encoders.text import BiGRUTextEncoder, l2norm

__all__ = ["BiGRUTextEncoder", "FCImageEncoder", "l2norm"]
