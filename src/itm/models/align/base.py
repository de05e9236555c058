"""The alignment-head interface and its protocol with the scoring engine (``engine.py``).

A head scores every (image, caption) pair of two sets of fragment embeddings. One file per
paper holds a head (``scan.py``, ``bfan.py``, ``chan.py``, ``imram.py``, ``vse_infinity.py``,
...), the attention step they share is ``attention.py``, and the block engine that evaluates the
full matrix is ``engine.py``. A new head subclasses :class:`AlignHead`, implements
:meth:`~AlignHead.forward` and :meth:`~AlignHead.alignment`, sets :attr:`~AlignHead.pooling_role`,
and adds a ``conf/model/align/<name>.yaml``; the conformance suite (``tests/test_conformance.py``)
then checks it without any test list being edited.

The engine protocol, per block of ``B1`` images and ``B2`` captions:

1. once per scoring run, ``prepare_images(img, img_mask)`` on all images (padded regions
   zeroed), returning per-image tensors ``[N_img, ...]`` that the engine slices by image rows;
2. once per caption block, ``prepare_captions(cap, cap_mask)`` (padded words zeroed);
3. ``score_block(images, captions, pooling, ws)`` with two :class:`Block` s: the block's
   embeddings (padded slots ZERO), masks, its rows of the prepared tensors, and a hashable
   ``key`` naming the block's items (images: the row span ``(i0, i1)``), which is the key of
   :meth:`itm.models.align.engine.Workspace.memo` for tensors derived per image block;
4. ``bytes_per_pair`` sizes the blocks under the memory budget.

Shapes: ``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
(bool, True = valid); slots past a length may hold any finite values and must never change a
result or reach a gradient.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor, nn

if TYPE_CHECKING:
    from itm.models.align.engine import Workspace

__all__ = ["DIRECTIONS", "AlignHead", "Block", "PoolingRole", "check_direction"]

DIRECTIONS = ("t2i", "i2t", "both")

#: How a head uses the ``pooling`` group: ``fragments`` = it reduces the head's per-fragment
#: scores (SCAN, CHAN, IMRAM); ``features`` = the head pools fragment FEATURES with copies of it
#: (VSE-infinity's ``global``); ``fixed`` = the head's method fixes its own aggregation and
#: accepts only the pooling that equals it (:attr:`AlignHead.fixed_pooling`).
PoolingRole = Literal["fragments", "features", "fixed"]


@dataclass(frozen=True)
class Block:
    """One side of a scoring block as the engine hands it to :meth:`AlignHead.score_block`.

    Attributes:
        emb: ``[B, N, d]`` embeddings; slots past each length are ZERO.
        mask: ``[B, N]`` bool, True = valid.
        cache: this block's rows of ``prepare_images`` (images) or the caption block's
            ``prepare_captions`` output (captions).
        key: names the block's items: the image row span ``(i0, i1)`` for images, the first
            sorted caption position for captions; within one run of the engine (one
            workspace), equal keys mean equal inputs.
        lowp: with ``precision="bf16"`` scoring, ``emb`` in bfloat16 (padded slots zero) for
            the head's large products; None in float32 scoring.
    """

    emb: Tensor
    mask: Tensor
    cache: Mapping[str, Tensor]
    key: Hashable
    lowp: Tensor | None = None

    @property
    def product(self) -> Tensor:
        """The embeddings the head's large products take: :attr:`lowp` in bf16 scoring,
        :attr:`emb` otherwise."""
        return self.emb if self.lowp is None else self.lowp


class AlignHead(nn.Module):
    """Base class of the alignment heads.

    Subclasses implement :meth:`forward` (the differentiable reference path used in training)
    and :meth:`alignment` (the head's picture of region-word alignment); they override
    :meth:`prepare_images`, :meth:`prepare_captions`, :meth:`score_block` and
    :meth:`bytes_per_pair` to give evaluation an in-place inference path.
    """

    #: how the head uses the ``pooling`` group (see :data:`PoolingRole`)
    pooling_role: ClassVar[PoolingRole] = "fragments"
    #: ``fixed`` heads: the pooling classes equal to the head's own aggregation (an instance of
    #: one, or None, is accepted; anything else is refused with the head's name)
    fixed_pooling: ClassVar[tuple[type, ...]] = ()
    #: ``fixed`` heads: the aggregation in words, for the refusal message
    fixed_pooling_name: ClassVar[str] = ""
    #: whether ``score_block`` implements ``precision="bf16"`` scoring (its large products in
    #: bfloat16 from :attr:`Block.lowp`, everything after them in float32); the engine refuses
    #: bf16 scoring for a head without it
    supports_bf16: ClassVar[bool] = False
    #: why a head without bf16 support refuses it (appended to the refusal message)
    bf16_refusal: ClassVar[str] = "it implements float32 scoring only"

    def forward(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> Tensor:  # pragma: no cover - interface
        """Scores ``[B1, B2]`` of every (image, caption) pair; ``pooling`` reduces fragment
        scores (``fragments`` heads) or is unused (the others pass None)."""
        raise NotImplementedError

    # --- pooling ------------------------------------------------------------------------------

    def bind_pooling(self, pooling: nn.Module | None) -> None:
        """Called once by :class:`~itm.models.similarity.Similarity` with the pooling module.

        A ``fixed`` head refuses a pooling other than its own aggregation (so that e.g.
        ``model/align=bfan pooling=lse`` fails instead of training mean pooling labelled LSE);
        a ``features`` head keeps copies of it (it overrides this method)."""
        if self.pooling_role != "fixed" or pooling is None:
            return
        if not isinstance(pooling, self.fixed_pooling):
            name = type(self).__name__
            raise ValueError(
                f"{name} aggregates its fragment scores by {self.fixed_pooling_name} and ignores "
                f"the pooling group, but got {type(pooling).__name__}: drop the pooling= "
                f"override (model/align's config selects the matching pooling)"
            )

    # --- the head's picture of alignment (viz, W&B, the alignment tests) ----------------------

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:  # pragma: no cover - interface
        """Region-word weights ``[L, K]`` of ONE pair from its valid fragments ``img [K, d]``
        and ``cap [L, d]`` (what the head attends to; see :attr:`alignment_normalised`)."""
        raise NotImplementedError

    @property
    def alignment_normalised(self) -> str | None:
        """Which axis of :meth:`alignment` sums to 1: ``"regions"`` (each word's row, t2i),
        ``"words"`` (each region's column, i2t), or None (not a distribution)."""
        return "regions"

    # --- block-wise inference (itm.models.align.engine.score_matrix) --------------------------

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        """Per-image quantities reused by every block (inference only), each ``[B1, ...]``.

        Called on images whose padded regions are zeroed; the engine slices the result by
        image rows into :attr:`Block.cache`. Default: nothing."""
        return {}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        """Per-caption quantities of one caption block (padded words zeroed). Default: none."""
        return {}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Scores ``[B1, B2]`` of one block under ``torch.no_grad()`` (the inference path).

        ``ws`` holds scratch buffers reused across blocks. The default calls :meth:`forward`;
        heads override it with in-place kernels. Must equal ``forward`` on the same block.
        """
        return self(images.emb, images.mask, captions.emb, captions.mask, pooling)

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """Upper estimate of the scoring workspace for one (image, caption) pair, in bytes.

        Used by block-wise scoring to size blocks under a memory budget (the conformance suite
        checks the measured workspace against it). The default assumes six live ``[K, L]``
        buffers (scores, normalised scores, weights, Gram product, temporaries).
        """
        return 6 * n_regions * n_words * elem_size


def check_direction(direction: str, allowed: tuple[str, ...] = DIRECTIONS) -> str:
    """``direction`` if it is one of ``allowed``, else a ValueError naming the choices."""
    if direction not in allowed:
        raise ValueError(f"direction must be one of {allowed}, got {direction!r}")
    return direction
