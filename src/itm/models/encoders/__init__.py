"""Image and text encoders: ``enc(x, lengths) -> [B, N, d]`` fragment embeddings.

In training with size augmentation on (``region_drop`` / ``word_aug`` > 0) an encoder returns
``(emb, new_lengths)`` instead. ``BertTextEncoder`` imports transformers only when built.
"""

from itm.models.encoders.augment import augment_words, drop_regions
from itm.models.encoders.bert import BertTextEncoder
from itm.models.encoders.image import FCImageEncoder, MLPImageEncoder
from itm.models.encoders.selfattn import SelfAttentionImageEncoder
from itm.models.encoders.text import BiGRUTextEncoder

__all__ = [
    "BertTextEncoder",
    "BiGRUTextEncoder",
    "FCImageEncoder",
    "MLPImageEncoder",
    "SelfAttentionImageEncoder",
    "augment_words",
    "drop_regions",
]
