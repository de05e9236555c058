"""MTFN re-ranking: the authors' i2t fixture, the stable tie order against a naive loop and
against the released script's introsort, the t2i variants (the oracle and text_sim), recall of
orders, COCO folds, ensembles, the sharded metric, and eval.py on a trained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_fixture, run_train_cli
from itm.data.pfan import classic_argsort
from itm.metrics import (
    CrossModalRecall,
    RerankSpec,
    evaluate_protocol,
    mtfn_rerank,
    recall_at_k,
    recall_from_orders,
)
from itm.metrics.recall import METRIC_KEYS


def _recall_vector(d: dict) -> np.ndarray:
    return np.array([d[k] for k in METRIC_KEYS])


# --- the authors' fixture -----------------------------------------------------------------------


@pytest.mark.parametrize(("k", "order", "keys", "after"), [
    (15, "i2t_order", "i2t_keys", "recall_after"),
    (5, "i2t_order_k5", "i2t_keys_k5", "recall_after_k5"),
])  # fmt: skip
def test_fixture_i2t(k, order, keys, after):
    f = load_fixture("mtfn_rerank_i2t")
    assert list(f["recall_keys"]) == list(METRIC_KEYS)
    out = mtfn_rerank(f["sims"], k_i2t=k)
    np.testing.assert_array_equal(out["i2t"], f[order])
    np.testing.assert_array_equal(out["t2i"], f["t2i_order_before"].T)  # t2i "none": plain
    # the re-sort keys: position of image i in its candidates' image rankings
    pos = np.argsort(out["t2i"], axis=1)  # [caption, image] -> position
    first = np.argsort(-f["sims"], axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(pos[first, np.arange(6)[:, None]], f[keys])
    r = recall_from_orders(out["i2t"], out["t2i"])
    np.testing.assert_allclose(_recall_vector(r), f[after], rtol=0, atol=1e-9)
    before = recall_from_orders(f["i2t_order_before"], f["t2i_order_before"].T)
    np.testing.assert_allclose(_recall_vector(before), f["recall_before"], rtol=0, atol=1e-9)
    assert recall_at_k(f["sims"]) == pytest.approx(before, abs=1e-12)


def test_fixture_torch_input_and_k1_is_the_plain_order():
    f = load_fixture("mtfn_rerank_i2t")
    out = mtfn_rerank(torch.as_tensor(f["sims"]), k_i2t=1, k_t2i=1, t2i="oracle_groups")
    np.testing.assert_array_equal(out["i2t"], f["i2t_order_before"])
    np.testing.assert_array_equal(out["t2i"], f["t2i_order_before"].T)


# --- a naive reference --------------------------------------------------------------------------


def _naive(sims, k_i2t, k_t2i, t2i, text_sims=None, cpi=5, sort=None):
    """The released script's loops (np.where per candidate), with a chosen sort for the keys."""
    sort = sort or (lambda keys: np.argsort(keys, kind="stable"))
    n_img, n_cap = sims.shape
    i2t0 = [np.argsort(-sims[i], kind="stable") for i in range(n_img)]
    t2i0 = [np.argsort(-sims[:, c], kind="stable") for c in range(n_cap)]
    i2t = []
    for i in range(n_img):
        cand = i2t0[i][:k_i2t]
        keys = np.array([np.where(t2i0[c] == i)[0][0] for c in cand], dtype=float)
        i2t.append(np.concatenate([cand[sort(keys)], i2t0[i][k_i2t:]]))
    t2i_rows = []
    for c in range(n_cap):
        cand = t2i0[c][:k_t2i]
        if t2i == "none":
            t2i_rows.append(t2i0[c])
            continue
        if t2i == "oracle_groups":
            group = range(cpi * (c // cpi), cpi * (c // cpi) + cpi)
        else:
            row = np.array(text_sims[c], dtype=float)
            row[c] = -np.inf
            group = [c, *np.argsort(-row, kind="stable")[: cpi - 1]]
        keys = np.array(
            [min(np.where(i2t0[j] == g)[0][0] for g in group) for j in cand], dtype=float
        )
        t2i_rows.append(np.concatenate([cand[sort(keys)], t2i0[c][k_t2i:]]))
    return np.stack(i2t), np.stack(t2i_rows)


def _tied_matrix(seed, n_img=25, cpi=5):
    """Scores quantised to a few levels: ties in the first stage and in the keys."""
    rng = np.random.default_rng(seed)
    s = rng.random((n_img, n_img * cpi))
    s[np.arange(n_img * cpi) // cpi, np.arange(n_img * cpi)] += 0.3  # some signal
    return np.round(s * 8) / 8


@pytest.mark.parametrize("t2i", ["none", "oracle_groups", "text_sim"])
@pytest.mark.parametrize("seed", [0, 1])
def test_stable_tie_order_matches_the_naive_loops(t2i, seed):
    sims = _tied_matrix(seed)
    text = np.round(np.random.default_rng(seed + 9).random((125, 125)) * 4)  # many ties
    text = text if t2i == "text_sim" else None
    out = mtfn_rerank(sims, 15, 20, t2i, text)
    ref_i2t, ref_t2i = _naive(sims, 15, 20, t2i, text)
    np.testing.assert_array_equal(out["i2t"], ref_i2t)
    np.testing.assert_array_equal(out["t2i"], ref_t2i)
    for order in (out["i2t"], out["t2i"]):  # full permutations
        assert (np.sort(order, axis=1) == np.arange(order.shape[1])).all()


def test_released_script_t2i_order_is_not_the_stable_one():
    """With k_t2i = 20 the script's np.argsort (classic introsort) partitions and reorders
    tied keys; itm's stable order keeps the first-stage order among them."""
    sims = _tied_matrix(3)
    ours = mtfn_rerank(sims, 15, 20, "oracle_groups")
    script_i2t, script_t2i = _naive(sims, 15, 20, "oracle_groups", sort=classic_argsort)
    np.testing.assert_array_equal(ours["i2t"], script_i2t)  # k = 15: an insertion sort, stable
    differ = (ours["t2i"] != script_t2i).any(axis=1)
    assert differ.sum() > 20  # most captions: the keys are small integers, ties everywhere


def test_text_sim_with_the_same_image_indicator_is_the_oracle():
    sims = _tied_matrix(4)
    same = (np.arange(125)[:, None] // 5 == np.arange(125)[None, :] // 5).astype(float)
    a = mtfn_rerank(sims, 15, 20, "oracle_groups")
    b = mtfn_rerank(sims, 15, 20, "text_sim", text_sims=same)
    np.testing.assert_array_equal(a["t2i"], b["t2i"])
    np.testing.assert_array_equal(a["i2t"], b["i2t"])


def test_recall_from_orders_equals_recall_at_k_on_plain_orders():
    rng = np.random.default_rng(5)
    sims = rng.standard_normal((30, 150))
    sims[np.arange(150) // 5, np.arange(150)] += 1.0
    i2t = np.argsort(-sims, axis=1)
    t2i = np.argsort(-sims.T, axis=1)
    assert recall_from_orders(i2t, t2i) == pytest.approx(recall_at_k(sims), abs=1e-12)
    plain = mtfn_rerank(sims, 1, 1, "none")
    assert recall_from_orders(plain["i2t"], plain["t2i"]) == pytest.approx(recall_at_k(sims))


def test_bad_input_is_named():
    sims = _tied_matrix(0)
    with pytest.raises(ValueError, match="captions"):
        mtfn_rerank(sims[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        mtfn_rerank(np.where(sims > 0.9, np.nan, sims))
    with pytest.raises(ValueError, match="t2i must be one of"):
        mtfn_rerank(sims, t2i="oracle")
    with pytest.raises(ValueError, match="needs text_sims"):
        mtfn_rerank(sims, t2i="text_sim")
    with pytest.raises(ValueError, match=r"\[125, 125\]"):
        mtfn_rerank(sims, t2i="text_sim", text_sims=np.zeros((10, 10)))
    with pytest.raises(ValueError, match="k_i2t"):
        mtfn_rerank(sims, k_i2t=0)
    out = mtfn_rerank(sims)
    with pytest.raises(ValueError, match="transposed"):
        recall_from_orders(out["i2t"], out["t2i"].T)
    bad = out["i2t"].copy()
    bad[3] = 0  # not a permutation: never lists image 3's captions
    with pytest.raises(ValueError, match="row 3"):
        recall_from_orders(bad, out["t2i"])
    for node, msg in (
        ({"method": "rr"}, "null or mtfn"),
        ({"method": "mtfn", "t2i": "text_sim"}, "text_sims"),
        ({"method": "mtfn", "t2i": "none", "text_sims": "x.npy"}, "only with t2i=text_sim"),
    ):
        with pytest.raises(ValueError, match=msg):
            RerankSpec.from_config(node)
    assert RerankSpec.from_config({"method": None}) is None
    assert "ORACLE" in RerankSpec.from_config({"method": "mtfn", "t2i": "oracle_groups"}).label


def test_large_matrix_is_fast_and_exact():
    """O(N log N) from two argsorts: a 1000 x 5000 matrix (a Flickr30K test split) in seconds."""
    import time

    rng = np.random.default_rng(6)
    sims = rng.standard_normal((1000, 5000)).astype(np.float32)
    t0 = time.perf_counter()
    out = mtfn_rerank(sims, 15, 20, "oracle_groups")
    assert time.perf_counter() - t0 < 20
    # spot-check rows against the naive loops on the same rows' data
    i, c = 17, 4321
    first = np.argsort(-sims[i], kind="stable")[:15]
    col_rank = {cand: int(np.where(np.argsort(-sims[:, cand], kind="stable") == i)[0][0])
                for cand in first}  # fmt: skip
    expected = sorted(first, key=lambda cand: col_rank[cand])  # Python's sort is stable
    np.testing.assert_array_equal(out["i2t"][i, :15], expected)
    assert sorted(out["t2i"][c].tolist()) == list(range(1000))


# --- protocols, ensembles, the sharded metric ---------------------------------------------------


def test_coco1k_reranks_inside_each_fold():
    sims = _tied_matrix(7, n_img=40) + np.random.default_rng(7).random((40, 200)) * 1e-3
    spec = RerankSpec(k_i2t=15, k_t2i=20, t2i="oracle_groups")
    res = evaluate_protocol(sims, "coco1k", fold_images=10, n_folds=4, rerank=spec)
    for f in range(4):
        block = sims[10 * f : 10 * f + 10, 50 * f : 50 * f + 50]
        assert res["folds"][f] == pytest.approx(spec.recall(block))
    assert res["rsum"] == pytest.approx(
        sum(np.mean([fo[f"{d}_r{k}"] for fo in res["folds"]]) for d in ("i2t", "t2i")
            for k in (1, 5, 10))
    )  # fmt: skip
    # text_sim slices the caption matrix per fold
    same = (np.arange(200)[:, None] // 5 == np.arange(200)[None, :] // 5).astype(float)
    ts = RerankSpec(t2i="text_sim", text_sims=None)
    res_ts = evaluate_protocol(sims, "coco1k", fold_images=10, n_folds=4, rerank=ts, text_sims=same)
    assert res_ts["rsum"] == pytest.approx(res["rsum"])


def test_metric_reranks_the_gathered_matrix_once():
    """Rows arriving in any order, with duplicates (DDP padding), give the re-ranking of the
    full matrix: the same code runs on every rank after the rows are gathered."""
    sims = (
        torch.as_tensor(_tied_matrix(8))
        + torch.rand(25, 125, generator=torch.Generator().manual_seed(0)) * 1e-4
    )
    spec = RerankSpec(t2i="oracle_groups")
    metric = CrossModalRecall(rerank={"method": "mtfn", "t2i": "oracle_groups"})
    order = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    for chunk in (order[:9], order[9:], order[:3]):
        metric.update(sims[chunk], chunk)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert {f"rr_{k}" for k in METRIC_KEYS} | set(METRIC_KEYS) | {"rr_oracle"} == set(out)
    expected = spec.recall(sims.numpy())
    assert {k: out[f"rr_{k}"] for k in METRIC_KEYS} == pytest.approx(expected)
    assert {k: out[k] for k in METRIC_KEYS} == pytest.approx(recall_at_k(sims))


def test_eval_reranks_ensembles_of_saved_matrices(compose, tmp_path):
    from itm.evaluate import evaluate
    from itm.metrics import ensemble

    rng = np.random.default_rng(9)
    mats = []
    for i in range(2):
        m = rng.standard_normal((20, 100)).astype(np.float32)
        m[np.arange(100) // 5, np.arange(100)] += 1.5
        np.save(tmp_path / f"m{i}.npy", m)
        mats.append(m)
    cfg = compose(
        [f"eval.matrices=[{tmp_path / 'm0.npy'},{tmp_path / 'm1.npy'}]",
         f"eval.output_dir={tmp_path / 'out'}", "eval.rerank.method=mtfn"],
        config_name="eval",
    )  # fmt: skip
    flat = evaluate(cfg)
    spec = RerankSpec()
    expected = spec.recall(ensemble(mats))
    assert {k: flat[f"f30k/rr_{k}"] for k in METRIC_KEYS} == pytest.approx(expected)
    assert "f30k/rr_oracle" not in flat


# --- eval.py on a trained checkpoint ------------------------------------------------------------


@pytest.mark.slow  # a real (tiny) training run and an eval.py process: ~30 s
def test_eval_cli_prints_plain_and_reranked_tables(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run_train_cli(
        ["debug=fast", "model/image_encoder=pfan", "model.image_encoder.pos_dim=16",
         "model.align.max_attn_bonus=0.5", "logger=none"],
        tmp_path,
    )  # fmt: skip
    ckpt = next(tmp_path.glob("train/runs/*/checkpoints/best.ckpt"))
    out = tmp_path / "eval_out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}", "eval.rerank.method=mtfn",
         "eval.rerank.t2i=oracle_groups", f"eval.output_dir={out}", "eval.device=cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "ITM_LOG_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.count("rsum") >= 2 and "f30k rr ORACLE" in text and "ORACLE" in text
    res = json.loads((out / "results.json").read_text())
    assert res["rerank"]["oracle"] is True and "ORACLE" in res["rerank"]["label"]
    assert set(res["rerank"]["results"]["f30k"]) >= set(METRIC_KEYS)
    md = (out / "results.md").read_text()
    assert "| f30k |" in md and "| f30k rr ORACLE |" in md


@pytest.mark.slow  # two spawned processes: ~35 s
def test_ddp_reranks_the_gathered_matrix_once(compose):
    """2 CPU processes (ddp_spawn): every rank scores its slice of image rows, the metric gathers
    them, and the re-ranked figures equal the single-process ones exactly (a PFAN model, so the
    per-region positions travel through the distributed loaders too)."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    cfg = compose(
        ["model/image_encoder=pfan", "model.image_encoder.pos_dim=8", "model.embed_size=32",
         "model.text_encoder.word_dim=16", "data.n_train=30", "data.n_dev=21", "data.n_test=21",
         "data.eval_batch_size=8", "model.eval_rerank.method=mtfn",
         "model.eval_rerank.t2i=oracle_groups"]
    )  # fmt: skip
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    kw = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    kw |= {"enable_progress_bar": False, "enable_model_summary": False}
    single = pl.Trainer(devices=1, **kw).test(model, datamodule=dm, verbose=False)[0]
    ddp = pl.Trainer(devices=2, strategy="ddp_spawn", **kw).test(
        model, datamodule=dm, verbose=False
    )[0]
    assert "test/rr_rsum" in single and single["test/rr_oracle"] == 1.0
    assert single == ddp
