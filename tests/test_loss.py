"""ContrastiveLoss: reference fixture, hand-computed cases, warm-up override, masking, gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itm.models.loss import ContrastiveLoss

FIXTURES = Path(__file__).parent / "data" / "fixtures"

# Hand-checkable 3x3 batch (rows = images, columns = captions, positives on the diagonal).
#   diag = 0.9, 0.8, 0.4; margin 0.2
#   cost_c[i, j] = [0.2 + S[i, j] - S[i, i]]_+ : nonzero only cost_c[2, 0] = 0.3, cost_c[2, 1] = 0.5
#   cost_i[i, j] = [0.2 + S[i, j] - S[j, j]]_+ : nonzero only cost_i[2, 1] = 0.1, cost_i[0, 2] = 0.4
S3 = [
    [0.9, 0.3, 0.6],
    [0.2, 0.8, 0.1],
    [0.5, 0.7, 0.4],
]
SUM_ALL = 0.3 + 0.5 + 0.1 + 0.4  # 1.3
HARDEST = 0.5 + (0.1 + 0.4)  # row maxes of cost_c (0, 0, 0.5) + column maxes of cost_i (0, .1, .4)


def sims3(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(S3, dtype=dtype)


def test_reference_fixture_max_violation() -> None:
    data = np.load(FIXTURES / "contrastive_loss_max_violation.npz")
    assert bool(data["max_violation"])
    loss_fn = ContrastiveLoss(margin=float(data["margin"]), max_violation=True)
    loss = loss_fn(torch.from_numpy(data["scores"]))
    assert loss.dtype == torch.float64 and loss.dim() == 0
    np.testing.assert_allclose(loss.item(), float(data["loss"]), rtol=0, atol=1e-9)


def test_hand_computed_3x3() -> None:
    assert ContrastiveLoss(0.2, max_violation=False)(sims3()).item() == pytest.approx(
        SUM_ALL, abs=1e-12
    )
    assert ContrastiveLoss(0.2, max_violation=True)(sims3()).item() == pytest.approx(
        HARDEST, abs=1e-12
    )
    # defaults: margin 0.2, hardest negatives
    assert ContrastiveLoss()(sims3()).item() == pytest.approx(HARDEST, abs=1e-12)


def test_margin_and_float32() -> None:
    # margin 0: only cost_c[2, 0] = 0.1, cost_c[2, 1] = 0.3, cost_i[0, 2] = 0.2 remain
    loss = ContrastiveLoss(margin=0.0, max_violation=False)(sims3(torch.float32))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.6, abs=1e-6)


def test_warmup_override() -> None:
    hardest = ContrastiveLoss(max_violation=True)
    all_neg = ContrastiveLoss(max_violation=False)
    assert hardest(sims3(), max_violation=False).item() == pytest.approx(SUM_ALL, abs=1e-12)
    assert all_neg(sims3(), max_violation=True).item() == pytest.approx(HARDEST, abs=1e-12)
    # None keeps the constructor's choice
    assert hardest(sims3(), max_violation=None).item() == pytest.approx(HARDEST, abs=1e-12)
    assert all_neg(sims3(), max_violation=None).item() == pytest.approx(SUM_ALL, abs=1e-12)


def test_false_negative_masking() -> None:
    # rows 1 and 2 show the same image (id 1); captions 1 and 2 both describe it.
    img_ids = torch.tensor([0, 1, 1])
    cap_img_ids = torch.tensor([0, 1, 1])
    # masked pairs (1, 2) and (2, 1): drops cost_c[2, 1] = 0.5 and cost_i[2, 1] = 0.1
    # remaining: cost_c[2, 0] = 0.3, cost_i[0, 2] = 0.4
    masked = ContrastiveLoss(max_violation=False, mask_false_negatives=True)
    assert masked(sims3(), img_ids=img_ids, cap_img_ids=cap_img_ids).item() == pytest.approx(
        0.7, abs=1e-12
    )
    masked_hard = ContrastiveLoss(max_violation=True, mask_false_negatives=True)
    # row maxes of cost_c: (0, 0, 0.3); column maxes of cost_i: (0, 0, 0.4)
    assert masked_hard(sims3(), img_ids=img_ids, cap_img_ids=cap_img_ids).item() == pytest.approx(
        0.7, abs=1e-12
    )
    # without ids, or with the flag off, nothing is masked
    assert masked_hard(sims3()).item() == pytest.approx(HARDEST, abs=1e-12)
    plain = ContrastiveLoss(max_violation=True)
    out = plain(sims3(), img_ids=img_ids, cap_img_ids=cap_img_ids)
    assert out.item() == pytest.approx(HARDEST, abs=1e-12)
    # distinct ids: identical to the unmasked loss
    distinct = torch.arange(3)
    assert masked_hard(sims3(), img_ids=distinct, cap_img_ids=distinct).item() == pytest.approx(
        HARDEST, abs=1e-12
    )
    with pytest.raises(ValueError, match="img_ids"):
        masked_hard(sims3(), img_ids=torch.arange(2), cap_img_ids=distinct)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_flow(max_violation: bool, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    sims = torch.randn(8, 8, generator=generator, dtype=dtype).requires_grad_(True)
    loss = ContrastiveLoss(max_violation=max_violation)(sims)
    loss.backward()
    assert sims.grad is not None and torch.isfinite(sims.grad).all()
    assert sims.grad.abs().sum() > 0
    # raising a positive score can only lower the loss: diagonal gradients are <= 0
    assert (sims.grad.diagonal() <= 0).all()


def test_gradient_hand_computed() -> None:
    sims = sims3().requires_grad_(True)
    ContrastiveLoss(max_violation=True)(sims).backward()
    # active terms: cost_c[2, 1] = m + S21 - S22 ; cost_i[2, 1] = m + S21 - S11 ;
    #               cost_i[0, 2] = m + S02 - S22
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[2, 1] = 2.0
    expected[2, 2] = -2.0
    expected[1, 1] = -1.0
    expected[0, 2] = 1.0
    torch.testing.assert_close(sims.grad, expected)


def test_non_square_raises() -> None:
    with pytest.raises(ValueError, match="square"):
        ContrastiveLoss()(torch.zeros(2, 3))
