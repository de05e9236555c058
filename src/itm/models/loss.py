"""VSE++ hinge-based triplet ranking loss (docs/foundations.md, "Loss and training").

The loss only ever sees a square similarity matrix, so it is agnostic of the device, of the
precision (float32 / float64) and of any distributed setup.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(nn.Module):
    """Bidirectional hinge loss with optional hardest-negative mining (VSE++ / SCAN).

    For a batch similarity matrix ``S`` [B, B] with ``S[i, j] = score(image i, caption j)`` and
    the positive pairs on the diagonal:

    - ``cost_c[i, j] = max(0, margin + S[i, j] - S[i, i])``: caption ``j`` as a negative of image
      ``i`` (row-wise),
    - ``cost_i[i, j] = max(0, margin + S[i, j] - S[j, j])``: image ``i`` as a negative of caption
      ``j`` (column-wise),

    both with the diagonal zeroed after the hinge. With ``max_violation`` only the row maximum of
    ``cost_c`` and the column maximum of ``cost_i`` (the hardest negatives) are kept; otherwise
    every negative contributes. The result is a SUM over the batch (not a mean), exactly as the
    reference implementations.

    Args:
        margin: hinge margin ``m`` (0.2 for SCAN / BFAN / IMRAM, 0.05 for CHAN).
        max_violation: default for hardest-negative mining; ``forward(max_violation=...)``
            overrides it per call (the training module passes ``False`` during warm-up epochs).
        mask_false_negatives: when ``True`` and the image ids of the rows and of the captions
            are passed to ``forward``, an off-diagonal pair ``(i, j)`` whose caption ``j``
            belongs to the same image as row ``i`` (``img_ids[i] == cap_img_ids[j]``) is not
            treated as a negative: its cost is zeroed (in both directions) before the max / sum.
            The references do not do this (off by default).
    """

    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        mask_false_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.margin = float(margin)
        self.max_violation = bool(max_violation)
        self.mask_false_negatives = bool(mask_false_negatives)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, max_violation={self.max_violation}, "
            f"mask_false_negatives={self.mask_false_negatives}"
        )

    def forward(
        self,
        sims: Tensor,
        *,
        max_violation: bool | None = None,
        img_ids: Tensor | None = None,
        cap_img_ids: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            sims: [B, B] float similarity matrix, rows = images, columns = captions; caption
                ``j`` is the positive of image ``j``.
            max_violation: ``None`` uses the constructor's value; ``True`` / ``False`` force
                hardest-negative / all-negative summation for this call.
            img_ids: [B] int, the dataset image id of each row (only used with
                ``mask_false_negatives``).
            cap_img_ids: [B] int, the dataset image id each caption (column) belongs to (only
                used with ``mask_false_negatives``).

        Returns:
            0-dim tensor of the same dtype as ``sims`` (summed over the batch).
        """
        if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
            raise ValueError(
                "ContrastiveLoss expects a square [B, B] similarity matrix with the positives on "
                f"the diagonal, got shape {tuple(sims.shape)}"
            )
        hardest = self.max_violation if max_violation is None else bool(max_violation)
        size = sims.shape[0]

        diagonal = sims.diagonal()  # [B]
        # caption negatives of image i: compare row i against its positive S[i, i]
        cost_c = (self.margin + sims - diagonal.unsqueeze(1)).clamp(min=0)  # [B, B]
        # image negatives of caption j: compare column j against its positive S[j, j]
        cost_i = (self.margin + sims - diagonal.unsqueeze(0)).clamp(min=0)  # [B, B]

        mask = torch.eye(size, dtype=torch.bool, device=sims.device)  # [B, B]
        if self.mask_false_negatives and img_ids is not None and cap_img_ids is not None:
            mask = mask | self._same_image_mask(img_ids, cap_img_ids, size, sims.device)
        cost_c = cost_c.masked_fill(mask, 0.0)
        cost_i = cost_i.masked_fill(mask, 0.0)

        if hardest:
            return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
        return cost_c.sum() + cost_i.sum()

    @staticmethod
    def _same_image_mask(
        img_ids: Tensor, cap_img_ids: Tensor, size: int, device: torch.device
    ) -> Tensor:
        """[B, B] bool, True where caption j belongs to the image of row i."""
        img_ids = torch.as_tensor(img_ids, device=device)
        cap_img_ids = torch.as_tensor(cap_img_ids, device=device)
        if img_ids.shape != (size,) or cap_img_ids.shape != (size,):
            raise ValueError(
                f"img_ids and cap_img_ids must both have shape [{size}] to match the [{size}, "
                f"{size}] similarity matrix, got {tuple(img_ids.shape)} and "
                f"{tuple(cap_img_ids.shape)}"
            )
        return img_ids.unsqueeze(1) == cap_img_ids.unsqueeze(0)
