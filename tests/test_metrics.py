"""Retrieval metrics: ranks, recall dict, the torchmetrics Metric, protocols, ensembles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from itm.metrics import (
    CrossModalRecall,
    ensemble,
    evaluate_protocol,
    ranks_i2t_t2i,
    recall_at_k,
    recall_from_ranks,
)

FIXTURES = Path(__file__).parent / "data" / "fixtures"
KEYS = [
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
]

# Hand-made 2 images x 10 captions (captions 0-4 -> image 0, 5-9 -> image 1).
H = [
    [0.1, 0.5, 0.2, 0.0, 0.3, 0.9, 0.6, 0.05, 0.04, 0.03],
    [0.2, 0.1, 0.0, 0.0, 0.0, 0.8, 0.3, 0.1, 0.7, 0.4],
]
# i2t: image 0's best caption scores 0.5; captions 5 (0.9) and 6 (0.6) beat it -> rank 2.
#      image 1's best caption scores 0.8; no other caption reaches it -> rank 0.
H_I2T = [2, 0]
# t2i: caption c ranks 1 when the other image scores >= the true one (caption 3 is a 0.0 / 0.0 tie:
#      pessimistic rank 1).
H_T2I = [1, 0, 0, 1, 0, 1, 1, 0, 0, 0]
H_METRICS = {
    "i2t_r1": 50.0,
    "i2t_r5": 100.0,
    "i2t_r10": 100.0,
    "i2t_medr": 2.0,  # median(0, 2) = 1 -> floor + 1
    "i2t_meanr": 2.0,
    "t2i_r1": 60.0,
    "t2i_r5": 100.0,
    "t2i_r10": 100.0,
    "t2i_medr": 1.0,
    "t2i_meanr": 1.4,
    "rsum": 510.0,
}


def reference_ranks(sims: np.ndarray, cpi: int) -> tuple[np.ndarray, np.ndarray]:
    """The references' argsort-based ranks (valid without ties)."""
    n_img = sims.shape[0]
    i2t = np.zeros(n_img)
    for i in range(n_img):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == c)[0][0] for c in range(cpi * i, cpi * (i + 1)))
    t2i = np.zeros(sims.shape[1])
    for c in range(sims.shape[1]):
        order = np.argsort(sims[:, c])[::-1]
        t2i[c] = np.where(order == c // cpi)[0][0]
    return i2t, t2i


def assert_dict_close(got: dict, expected: dict, atol: float = 1e-9) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, abs=atol), key


# ----------------------------------------------------------------------------- ranks and recall


def test_reference_fixture_4x20() -> None:
    data = np.load(FIXTURES / "recall_4x20.npz")
    sims = data["sims"]
    i2t, t2i = ranks_i2t_t2i(torch.from_numpy(sims), torch.arange(20) // 5)
    np.testing.assert_array_equal(i2t.numpy(), data["i2t_ranks"])
    np.testing.assert_array_equal(t2i.numpy(), data["t2i_ranks"])
    metrics = recall_at_k(sims, captions_per_image=5)
    assert list(metrics) == KEYS
    assert all(type(v) is float for v in metrics.values())
    got_i2t = [metrics[k] for k in KEYS[:5]]
    got_t2i = [metrics[k] for k in KEYS[5:10]]
    np.testing.assert_allclose(got_i2t, data["i2t_metrics"], atol=1e-9)
    np.testing.assert_allclose(got_t2i, data["t2i_metrics"], atol=1e-9)
    assert metrics["rsum"] == pytest.approx(float(data["rsum"]), abs=1e-9)
    # the same from the fixture's ranks
    assert_dict_close(recall_from_ranks(data["i2t_ranks"], data["t2i_ranks"]), metrics)


def test_hand_made_2x10() -> None:
    i2t, t2i = ranks_i2t_t2i(torch.tensor(H), torch.arange(10) // 5)
    assert i2t.tolist() == H_I2T
    assert t2i.tolist() == H_T2I
    assert i2t.dtype == torch.long and t2i.dtype == torch.long
    assert_dict_close(recall_at_k(torch.tensor(H)), H_METRICS)


def test_constant_matrix_gives_worst_ranks() -> None:
    sims = torch.full((4, 20), 0.5)
    i2t, t2i = ranks_i2t_t2i(sims, torch.arange(20) // 5)
    assert i2t.tolist() == [15] * 4  # every one of the 15 other captions ties
    assert t2i.tolist() == [3] * 20  # every one of the 3 other images ties
    metrics = recall_at_k(sims)
    assert metrics["i2t_r1"] == metrics["i2t_r10"] == metrics["t2i_r1"] == 0.0
    assert metrics["t2i_r5"] == 100.0  # only 4 images: rank 3 is always within the top 5
    assert metrics["i2t_medr"] == 16.0 and metrics["t2i_medr"] == 4.0
    assert metrics["i2t_meanr"] == 16.0 and metrics["t2i_meanr"] == 4.0


def test_ties_among_positives_do_not_count() -> None:
    # image 0: its two captions tie at 0.7 with one negative caption -> rank 1
    sims = torch.tensor([[0.7, 0.7, 0.7, 0.1], [0.0, 0.0, 0.9, 0.9]])
    i2t, t2i = ranks_i2t_t2i(sims, torch.tensor([0, 0, 1, 1]))
    assert i2t.tolist() == [1, 0]
    assert t2i.tolist() == [0, 0, 0, 0]


def test_chunking_matches_argsort_reference() -> None:
    generator = np.random.default_rng(0)
    sims = generator.standard_normal((13, 65))
    ref_i2t, ref_t2i = reference_ranks(sims, 5)
    for budget in (1e-6, 1e-3, 64.0):  # 1 row per block, a few rows, one block
        i2t, t2i = ranks_i2t_t2i(torch.from_numpy(sims), torch.arange(65) // 5, max_block_mb=budget)
        np.testing.assert_array_equal(i2t.numpy(), ref_i2t)
        np.testing.assert_array_equal(t2i.numpy(), ref_t2i)


def test_explicit_cap_to_img() -> None:
    # the 2x10 matrix with its columns permuted: same metrics with the permuted mapping
    perm = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    sims = torch.tensor(H)[:, perm]
    cap_to_img = perm // 5
    assert_dict_close(recall_at_k(sims, cap_to_img=cap_to_img), H_METRICS)
    assert_dict_close(recall_at_k(sims.numpy(), cap_to_img=cap_to_img.numpy()), H_METRICS)


def test_numpy_and_torch_agree() -> None:
    sims = np.random.default_rng(1).standard_normal((6, 30))
    from_numpy = recall_at_k(sims)
    from_torch = recall_at_k(torch.from_numpy(sims))
    from_float32 = recall_at_k(torch.from_numpy(sims).float())
    assert from_numpy == from_torch == from_float32
    assert all(type(v) is float for v in from_numpy.values())


def test_medr_even_count_uses_numpy_median() -> None:
    # i2t ranks 0, 1, 4, 9: numpy median 2.5 -> medr 3 (a lower median would give 2)
    metrics = recall_from_ranks(torch.tensor([0, 1, 4, 9]), np.array([0, 3]))
    assert metrics["i2t_medr"] == 3.0
    assert metrics["i2t_meanr"] == 4.5
    assert metrics["i2t_r1"] == 25.0 and metrics["i2t_r5"] == 75.0 and metrics["i2t_r10"] == 100.0
    # t2i ranks 0, 3: median 1.5 -> medr 2
    assert metrics["t2i_medr"] == 2.0
    assert metrics["rsum"] == 25 + 75 + 100 + 50 + 100 + 100


def test_wrong_shapes_raise() -> None:
    with pytest.raises(ValueError, match="captions_per_image=5"):
        recall_at_k(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(torch.zeros(10))
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        recall_at_k(torch.zeros(2, 10), cap_to_img=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(torch.zeros(3, 10), cap_to_img=torch.arange(10) // 5)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), captions_per_image=1)


# ----------------------------------------------------------------------------- CrossModalRecall


def test_the_metric_does_not_shadow_torchmetrics_retrieval_recall() -> None:
    """itm's matrix recall has its own name: ``from itm.metrics import *`` next to torchmetrics'
    per-query ``RetrievalRecall`` must not replace one with the other."""
    import torchmetrics.retrieval

    import itm.metrics
    import itm.metrics.recall

    assert CrossModalRecall.__name__ == "CrossModalRecall"
    for module in (itm.metrics, itm.metrics.recall):
        assert not hasattr(module, "RetrievalRecall"), module.__name__
        assert "RetrievalRecall" not in getattr(module, "__all__", ())
    assert torchmetrics.retrieval.RetrievalRecall is not CrossModalRecall


def _shuffled_padded_slices(n_img: int, seed: int, world: int = 3) -> list[torch.Tensor]:
    """Row ids as a DistributedSampler would deal them: shuffled, padded, strided per rank."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_img, generator=generator)
    padded = torch.cat([order, order[: (-n_img) % world]])  # DistributedSampler padding
    return [padded[r::world] for r in range(world)]


def test_retrieval_recall_shuffled_duplicated_slices() -> None:
    sims = torch.from_numpy(np.random.default_rng(2).standard_normal((11, 55)))
    expected = recall_at_k(sims)
    metric = CrossModalRecall(captions_per_image=5)
    for ids in _shuffled_padded_slices(11, seed=0):
        for chunk in ids.split(2):  # several batches per "rank"
            metric.update(sims[chunk], chunk)
    result = metric.compute()
    assert list(result) == KEYS
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in result.values())
    assert {k: float(v) for k, v in result.items()} == expected

    # reset clears everything; a second epoch gives the same value
    metric.reset()
    for ids in _shuffled_padded_slices(11, seed=1):
        metric.update(sims[ids], ids)
    assert {k: float(v) for k, v in metric.compute().items()} == expected


def test_retrieval_recall_cap_to_img() -> None:
    perm = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    sims = torch.tensor(H, dtype=torch.float64)[:, perm]
    in_ctor = CrossModalRecall(cap_to_img=perm // 5)
    in_ctor.update(sims[[1]], torch.tensor([1]))
    in_ctor.update(sims[[0, 1]], torch.tensor([0, 1]))
    assert_dict_close(in_ctor.compute(), H_METRICS)

    in_update = CrossModalRecall()
    in_update.update(sims[[1, 0]], torch.tensor([1, 0]), cap_to_img=perm // 5)
    assert_dict_close(in_update.compute(), H_METRICS)
    with pytest.raises(ValueError, match="differs"):
        in_update.update(sims[[0]], torch.tensor([0]), cap_to_img=torch.arange(10) // 5)
    in_update.reset()  # forgets the update-given mapping: default c // 5 again
    in_update.update(torch.tensor(H), torch.tensor([0, 1]))
    assert_dict_close(in_update.compute(), H_METRICS)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_retrieval_recall_missing_or_bad_ids_raise() -> None:
    sims = torch.randn(4, 20)
    metric = CrossModalRecall()
    metric.update(sims[[0, 1, 3, 3]], torch.tensor([0, 1, 3, 3]))
    with pytest.raises(ValueError, match=r"1 missing \(first: \[2\]\)"):
        metric.compute()

    metric = CrossModalRecall()
    metric.update(sims, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="out of range"):
        metric.compute()

    with pytest.raises(ValueError, match="before any update"):
        CrossModalRecall().compute()
    with pytest.raises(ValueError, match="img_ids"):
        CrossModalRecall().update(sims, torch.tensor([0, 1]))
    metric = CrossModalRecall()
    metric.update(sims[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="caption columns"):
        metric.update(torch.randn(2, 15), torch.tensor([2, 3]))


def test_retrieval_recall_emulated_ddp_sync() -> None:
    """Two "ranks" synchronised through torchmetrics' own sync path with an in-process gather."""
    sims = torch.from_numpy(np.random.default_rng(3).standard_normal((7, 35)))
    shards = _shuffled_padded_slices(7, seed=4, world=2)  # 4 rows each, one padding duplicate
    gathered: dict[int, list[torch.Tensor]] = {}

    def fake_all_gather(x: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return gathered[x.dim()]  # 2: rows [n, N_cap], 1: ids [n]; rank 0 first

    local = []
    for ids in shards:
        metric = CrossModalRecall(
            dist_sync_fn=fake_all_gather, distributed_available_fn=lambda: True
        )
        for chunk in ids.split(3):
            metric.update(sims[chunk], chunk)
        local.append(metric)
    gathered[2] = [torch.cat(m.rows) for m in local]
    gathered[1] = [torch.cat(m.img_ids) for m in local]

    expected = recall_at_k(sims)
    for metric in local:
        assert {k: float(v) for k, v in metric.compute().items()} == expected
        assert isinstance(metric.rows, list) and len(metric.rows) == 2  # unsynced again


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sims = torch.from_numpy(np.random.default_rng(3).standard_normal((7, 35)))
        ids = _shuffled_padded_slices(7, seed=4, world=world)[rank]  # 4 rows each, 1 duplicate
        metric = CrossModalRecall()
        for chunk in ids.split(3):
            metric.update(sims[chunk], chunk)
        result = {k: float(v) for k, v in metric.compute().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_retrieval_recall_ddp_gloo() -> None:
    """Real 2-process gloo run (~20 s: each spawned child imports torch)."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(world, init_file, tmp), nprocs=world, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    sims = torch.from_numpy(np.random.default_rng(3).standard_normal((7, 35)))
    expected = recall_at_k(sims)
    assert results[0] == expected
    assert results[1] == expected


# ----------------------------------------------------------------------------- protocols


def _coco1k_toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """10 x 50 matrix of 5 folds of 2 images x 10 captions.

    Folds 0 and 2 hold the hand-made block H, folds 1, 3, 4 a perfect block P; every score
    outside the fold blocks is 100, so a slicing error would change the fold results.
    """
    h = torch.tensor(H, dtype=torch.float64)
    p = (torch.arange(10).unsqueeze(0) // 5 == torch.arange(2).unsqueeze(1)).double()  # [2, 10]
    sims = torch.full((10, 50), 100.0, dtype=torch.float64)
    for f, block in enumerate([h, p, h, p, p]):
        sims[2 * f : 2 * f + 2, 10 * f : 10 * f + 10] = block
    return sims, h, p


P_METRICS = {k: (1.0 if k.endswith(("medr", "meanr")) else 100.0) for k in KEYS}
P_METRICS["rsum"] = 600.0


def test_coco1k_fold_slicing_and_averaged_rsum() -> None:
    sims, _, _ = _coco1k_toy()
    result = evaluate_protocol(sims, "coco1k", fold_images=2)
    folds = result.pop("folds")
    assert len(folds) == 5
    for f, expected in enumerate([H_METRICS, P_METRICS, H_METRICS, P_METRICS, P_METRICS]):
        assert_dict_close(folds[f], expected)
    expected_avg = {
        "i2t_r1": (2 * 50 + 3 * 100) / 5,  # 80
        "i2t_r5": 100.0,
        "i2t_r10": 100.0,
        "i2t_medr": (2 * 2 + 3 * 1) / 5,  # 1.4
        "i2t_meanr": (2 * 2 + 3 * 1) / 5,  # 1.4
        "t2i_r1": (2 * 60 + 3 * 100) / 5,  # 84
        "t2i_r5": 100.0,
        "t2i_r10": 100.0,
        "t2i_medr": 1.0,
        "t2i_meanr": (2 * 1.4 + 3 * 1) / 5,  # 1.16
        "rsum": 80 + 100 + 100 + 84 + 100 + 100,  # 564: sum of the AVERAGED R@K
    }
    assert_dict_close(result, expected_avg)


def test_coco1k_plus_5k_and_whole_matrix_protocols() -> None:
    sims, _, _ = _coco1k_toy()
    both = evaluate_protocol(sims.numpy(), "coco1k+5k", fold_images=2)
    assert set(both) == {"coco1k", "coco5k"}
    assert both["coco1k"]["rsum"] == pytest.approx(564.0)
    assert both["coco5k"] == recall_at_k(sims)
    # in the whole matrix the off-fold 100s beat every positive: worst possible i2t
    assert both["coco5k"]["i2t_r10"] == 0.0
    assert evaluate_protocol(sims, "coco5k") == recall_at_k(sims)
    h = torch.tensor(H)
    assert_dict_close(evaluate_protocol(h, "f30k"), H_METRICS)


def test_protocol_errors() -> None:
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate_protocol(torch.zeros(2, 10), "coco2k")
    with pytest.raises(ValueError, match=r"5 folds of 2 images x 10 captions"):
        evaluate_protocol(torch.zeros(8, 40), "coco1k", fold_images=2)
    with pytest.raises(ValueError, match="captions_per_image"):
        evaluate_protocol(torch.zeros(2, 11), "f30k")


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_averaging() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 8.0]])
    c = np.array([[2.0, 1.0], [2.0, 0.0]])
    torch.testing.assert_close(ensemble([a, b]), torch.tensor([[2.0, 1.0], [2.0, 6.0]]))
    mixed = ensemble([a, b, c])
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, torch.tensor([[2.0, 1.0], [2.0, 4.0]], dtype=torch.float64))
    only_numpy = ensemble([a.numpy(), c])
    assert isinstance(only_numpy, np.ndarray)
    np.testing.assert_allclose(only_numpy, [[1.5, 1.5], [2.5, 2.0]])
    # inputs are not modified
    assert a.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    # an ensemble of one is the matrix itself; the ensemble of two models is ranked as usual
    torch.testing.assert_close(ensemble([a]), a)
    h = torch.tensor(H, dtype=torch.float64)
    assert_dict_close(recall_at_k(ensemble([h + 1.0, h - 1.0])), H_METRICS)


def test_ensemble_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ensemble([])
    with pytest.raises(ValueError, match=r"matrix 0 is \[2, 10\] but matrix 1 is \[2, 5\]"):
        ensemble([torch.zeros(2, 10), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="2-D"):
        ensemble([torch.zeros(3)])
