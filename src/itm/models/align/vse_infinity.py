"""VSE-infinity's global alignment (Chen et al., CVPR 2021; docs/vse_infinity.md), config
``model/align=global``.

One vector per image and per caption: the fragment FEATURES are pooled over the valid regions /
words (VSE-infinity: one GPO per modality), l2-normalised, and the score of a pair is the cosine
of the two vectors. No cross attention: the whole ``[B1, B2]`` matrix is one matrix product.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from itm.models.align.base import AlignHead, Block
from itm.models.align.engine import Workspace
from itm.models.functional import l2n


class GlobalAlign(AlignHead):
    """Pool each modality into one vector, l2-normalise, score by the cosine.

    The head owns one pooling module per side, ``image_pool`` (regions) and ``text_pool``
    (words): the module given for that side (``image_pooling`` / ``text_pooling``, the config
    groups of the same names; VSRN pools regions with ``gru_last`` and words with ``last``), or
    else an independent deep copy of the configured ``pooling``, made by :meth:`bind_pooling`
    (which :class:`~itm.models.similarity.Similarity` calls), so Similarity keeps no unused copy
    (``pooling_role = "features"``). Works with any :class:`~itm.models.pooling.SetPooling`
    (``gpo`` as in VSE-infinity, ``avg`` / ``max``, ``gru_last`` / ``last``). VSE-infinity
    pools UN-normalised features: its recipes set the encoders' ``norm: false``.

    Used without Similarity and without :meth:`bind_pooling`, the ``pooling`` argument of
    :meth:`forward` pools each side that has no module of its own.

    Args:
        image_pooling: the region pooling (None: a copy of ``pooling``).
        text_pooling: the word pooling (None: a copy of ``pooling``).
    """

    pooling_role = "features"
    bf16_refusal = (
        "its scores are one [N_img, d] x [d, N_cap] product of pooled vectors, which float32 "
        "computes in about a second even for COCO 5K, while bf16 moves R@1 by a point"
    )

    def __init__(
        self, image_pooling: nn.Module | None = None, text_pooling: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.image_pool: nn.Module | None = image_pooling
        self.text_pool: nn.Module | None = text_pooling

    def bind_pooling(self, pooling: nn.Module | None) -> None:
        """Give each side without a pooling of its own an independent copy of ``pooling``."""
        if pooling is None and (self.image_pool is None or self.text_pool is None):
            raise ValueError(
                "the global head pools fragment features: it needs a pooling (or both "
                "image_pooling and text_pooling)"
            )
        if self.image_pool is None:
            self.image_pool = copy.deepcopy(pooling)
        if self.text_pool is None:
            self.text_pool = copy.deepcopy(pooling)

    def _pools(self, pooling: nn.Module | None) -> tuple[nn.Module, nn.Module]:
        """(image pooling, text pooling): each side's own, else ``pooling``."""
        if (self.image_pool is None or self.text_pool is None) and pooling is None:
            raise RuntimeError(
                "GlobalAlign has no pooling: call bind_pooling(pooling) (Similarity does) "
                "or pass a pooling module to forward"
            )
        image = self.image_pool if self.image_pool is not None else pooling
        text = self.text_pool if self.text_pool is not None else pooling
        assert image is not None and text is not None
        return image, text

    def image_vectors(
        self, img: Tensor, img_mask: Tensor, pooling: nn.Module | None = None
    ) -> Tensor:
        """l2-normalised image vectors: ``img [B1, K, d] -> [B1, d]``."""
        return l2n(self._pools(pooling)[0](img, img_mask))

    def caption_vectors(
        self, cap: Tensor, cap_mask: Tensor, pooling: nn.Module | None = None
    ) -> Tensor:
        """l2-normalised caption vectors: ``cap [B2, L, d] -> [B2, d]``."""
        return l2n(self._pools(pooling)[1](cap, cap_mask))

    def embed(
        self,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Both modalities' global vectors, ``([B1, d], [B2, d])``."""
        return self.image_vectors(img, img_mask, pooling), self.caption_vectors(
            cap, cap_mask, pooling
        )

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

    # --- block-wise inference: pool once per image / caption, then one product per block -----

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        """The image vectors ``vec [B1, d]`` (the engine calls this in chunks of images, so the
        pooling's memory is bounded however many images are scored)."""
        return {"vec": self.image_vectors(img, img_mask)}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        """The caption vectors ``vec [B2, d]`` of one caption block."""
        return {"vec": self.caption_vectors(cap, cap_mask)}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """The cosines of the block: one ``[B1, d] x [d, B2]`` product."""
        return images.cache["vec"] @ captions.cache["vec"].T

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """A plain product: the score itself plus a temporary per pair (the vectors are
        pooled once per image and caption, outside the blocks)."""
        return 2 * elem_size
