"""Image and text encoders: ``enc(x, lengths) -> [B, N, d]`` fragment embeddings.

In training with size augmentation on (``region_drop`` / ``word_aug`` > 0) an encoder returns
``(emb, new_lengths)`` instead. ``BertTextEncoder`` and ``BertCNNTextEncoder`` import
transformers only when built. An encoder that reads per-region inputs besides the features
(PFAN's ``positions``) names them in a class attribute ``extra_inputs`` and takes them as keyword
arguments. A text encoder that reads ids of its own tokenizer (BERT) provides it with a
class-level ``caption_tokenizer(config)`` (:func:`caption_tokenizer`).
"""

from itm.models.encoders.augment import augment_words, drop_region_rows, drop_regions
from itm.models.encoders.bert import BertTextEncoder
from itm.models.encoders.bert_cnn import BertCNNTextEncoder
from itm.models.encoders.gcn import GCNImageEncoder
from itm.models.encoders.image import FCImageEncoder, MLPImageEncoder
from itm.models.encoders.inputs import declared_inputs
from itm.models.encoders.pfan import PFANImageEncoder
from itm.models.encoders.selfattn import SelfAttentionImageEncoder
from itm.models.encoders.text import BiGRUTextEncoder
from itm.models.encoders.tokenizer import caption_tokenizer
from itm.models.encoders.transformer import TransformerImageEncoder

__all__ = [
    "BertCNNTextEncoder",
    "BertTextEncoder",
    "BiGRUTextEncoder",
    "FCImageEncoder",
    "GCNImageEncoder",
    "MLPImageEncoder",
    "PFANImageEncoder",
    "SelfAttentionImageEncoder",
    "TransformerImageEncoder",
    "augment_words",
    "caption_tokenizer",
    "declared_inputs",
    "drop_region_rows",
    "drop_regions",
]
