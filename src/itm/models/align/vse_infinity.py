"""VSE-infinity's global alignment (Chen et al., CVPR 2021; docs/vse_infinity.md), config
``model/align=global``.

One vector per image and per caption: the fragment FEATURES are pooled over the valid regions /
words (VSE-infinity: one GPO per modality), l2-normalised, and the score of a pair is the cosine
of the two vectors. No cross attention: the whole ``[B1, B2]`` matrix is one matrix product.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from itm.models.align.base import AlignHead
from itm.models.functional import l2n


class GlobalAlign(AlignHead):
    """Pool each modality into one vector, l2-normalise, score by the cosine.

    The head owns TWO independent deep copies of the configured pooling module,
    ``image_pool`` (regions) and ``text_pool`` (words), made by :meth:`bind_pooling` (which
    :class:`~itm.models.similarity.Similarity` calls), so Similarity keeps no unused copy
    (``pooling_role = "features"``). Works with any :class:`~itm.models.pooling.SetPooling`
    (``gpo`` as in VSE-infinity, or ``avg`` / ``max``). VSE-infinity pools UN-normalised features: its recipes
    set the encoders' ``norm: false``.

    Used without Similarity and without :meth:`bind_pooling`, the ``pooling`` argument of
    :meth:`forward` pools both modalities (shared module).
    """

    pooling_role = "features"

    def __init__(self) -> None:
        super().__init__()
        self.image_pool: nn.Module | None = None
        self.text_pool: nn.Module | None = None

    def bind_pooling(self, pooling: nn.Module | None) -> None:
        """Keep two independent copies of ``pooling``: ``image_pool`` and ``text_pool``."""
        if pooling is None:
            raise ValueError("the global head pools fragment features: it needs a pooling")
        self.image_pool = copy.deepcopy(pooling)
        self.text_pool = copy.deepcopy(pooling)

    def embed(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling=None
    ) -> tuple[Tensor, Tensor]:
        """l2-normalised global vectors: ``img [B1, K, d] -> [B1, d]``, ``cap [B2, L, d] ->
        [B2, d]``."""
        image_pool, text_pool = self.image_pool, self.text_pool
        if image_pool is None or text_pool is None:
            if pooling is None:
                raise RuntimeError(
                    "GlobalAlign has no pooling: call bind_pooling(pooling) (Similarity does) "
                    "or pass a pooling module to forward"
                )
            image_pool = text_pool = pooling
        return l2n(image_pool(img, img_mask)), l2n(text_pool(cap, cap_mask))

    def forward(
        self,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module | None = None,
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> cosine matrix ``[B1, B2]``. ``pooling`` is used only by an unbound head."""
        v, e = self.embed(img, img_mask, cap, cap_mask, pooling)
        return v @ e.T

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """No attention: the cosine of every (word, region) pair of fragment embeddings,
        ``[L, K]`` (not a distribution)."""
        return l2n(cap) @ l2n(img).T

    @property
    def alignment_normalised(self) -> None:
        return None

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """A plain product: the score itself plus a temporary per pair. (The per-image and
        per-caption pooling workspace is not per pair and is not counted.)"""
        return 2 * elem_size
