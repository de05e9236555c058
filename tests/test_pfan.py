"""PFAN: position rows (numpy's classic introsort tie order), the position-focused image encoder
against the authors' fixture, per-region inputs served by the data only when asked for, region
dropping on the same rows, the released position files, and the `itm-prepare` command."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import load_fixture
from itm.data import SyntheticDataModule, collate_images, pfan_positions
from itm.data.pfan import classic_argsort
from itm.data.validation import DataError, DataWarning
from itm.models.encoders import PFANImageEncoder, declared_inputs, drop_region_rows
from precomp_utils import write_precomp

# --- the classic introsort ----------------------------------------------------------------------


def test_classic_argsort_hand_traced_ties():
    # 20 equal values: one partition round (pivot slot 9 goes to 18 and back), then two
    # insertion sorts that move nothing; traced by hand from numpy's aquicksort
    assert classic_argsort(np.full(20, 0.5)).tolist() == [0, *range(17, 0, -1), 18, 19]
    # up to 16 items the introsort is one insertion sort: stable
    assert classic_argsort(np.full(16, 0.5)).tolist() == list(range(16))
    x = np.array([3.0, 1.0, 2.0, 1.0, np.nan, 0.0])
    assert classic_argsort(x).tolist() == [5, 1, 3, 2, 0, 4]  # NaN last, as numpy
    assert classic_argsort([]).tolist() == [] and classic_argsort([7.0]).tolist() == [0]


def test_classic_argsort_sorts():
    rng = np.random.default_rng(0)
    for n in (17, 18, 40, 257):
        x = rng.integers(0, 4, n).astype(float)
        order = classic_argsort(x)
        assert sorted(order.tolist()) == list(range(n))
        assert (np.diff(x[order]) >= 0).all()


# the numpy of a subprocess with every dispatched SIMD target disabled falls back to the classic
# introsort; where that works it is an independent reference for the port
_CLASSIC_NUMPY = textwrap.dedent(
    """
    import sys, numpy as np
    cases = np.load(sys.argv[1], allow_pickle=False)
    out = {k: np.argsort(cases[k]) for k in cases.files}
    np.savez(sys.argv[2], **out)
    """
)


def test_classic_argsort_matches_numpy_without_simd(tmp_path):
    try:  # the SIMD targets numpy dispatches to (numpy >= 2; 1.x: numpy.core)
        from numpy._core import _multiarray_umath as mu
    except ImportError:
        from numpy.core import _multiarray_umath as mu

    dispatch = getattr(mu, "__cpu_dispatch__", [])
    rng = np.random.default_rng(1)
    cases = {"sentinel": np.full(20, 1.0)}
    for t in range(600):
        n = int(rng.integers(17, 300))
        kind = t % 4
        if kind == 0:
            x = rng.integers(0, 3, n).astype(float)
        elif kind == 1:
            x = np.round(rng.random(n), 1)
        elif kind == 2:  # PFAN-like: many whole blocks of equal overlap, some partial ones
            x = np.where(rng.random(n) < 0.7, 1 / 256, rng.random(n) / 256)
        else:  # sawtooth inputs reach the heapsort fallback
            x = (np.arange(n) % int(rng.integers(2, 9))).astype(float)
        cases[f"c{t}"] = x
    np.savez(tmp_path / "cases.npz", **cases)
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(dispatch)}
    proc = subprocess.run(
        [sys.executable, "-c", _CLASSIC_NUMPY, tmp_path / "cases.npz", tmp_path / "out.npz"],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"numpy refused to disable its SIMD targets: {proc.stderr[-300:]}")
    out = np.load(tmp_path / "out.npz")
    if out["sentinel"].tolist() != classic_argsort(cases["sentinel"]).tolist():
        pytest.skip("this numpy has no classic introsort fallback to compare with")
    bad = [k for k in cases if not np.array_equal(out[k], classic_argsort(cases[k]))]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ from numpy's introsort: {bad[:5]}"


# --- position rows ------------------------------------------------------------------------------


def test_positions_hand_case():
    # 160 x 160 image, 10-pixel blocks; box x 5..25, y 0..10: blocks ix 0..2 at iy 0 (iy 1 only
    # touches the box and is dropped), overlaps 1/512, 1/256, 1/512
    boxes = np.array([[[5.0, 0.0, 25.0, 10.0], [0.0, 5.0, 10.0, 25.0]]])
    p = pfan_positions(boxes, np.array([[160.0, 160.0]]))
    assert p.shape == (1, 2, 31) and p.dtype == np.float64
    # descending; the tied blocks 0 and 32 come out in reverse list order
    assert p[0, 0, :3].tolist() == [16.0, 32.0, 0.0]
    np.testing.assert_allclose(p[0, 0, 15:18], [0.5, 0.25, 0.25], atol=1e-15)
    assert (p[0, 0, 3:15] == 256).all() and (p[0, 0, 18:30] == 0).all()
    assert p[0, 0, 30] == pytest.approx(20 * 10 / 160**2)
    # the transposed box: index = i_x * 16 + i_y, so its blocks are 0, 1, 2 (not 0, 16, 32)
    assert p[0, 1, :3].tolist() == [1.0, 2.0, 0.0]


def test_positions_clip_above_not_below():
    # a box past the right edge: clipped to 1 for the blocks, the area uses the raw box
    p = pfan_positions(np.array([[150.0, 0.0, 200.0, 10.0]]), np.array([160.0, 160.0]))
    assert p.shape == (1, 31)
    assert sorted(p[0, :15][p[0, :15] < 256].tolist()) == [240.0]  # ix 15 only; 16+ skipped
    assert p[0, 30] == pytest.approx(50 * 10 / 160**2)
    # a slightly negative x1 is not clipped: block 0 still only from int(x1 * G) = 0
    q = pfan_positions(np.array([[-3.0, 0.0, 10.0, 10.0]]), np.array([160.0, 160.0]))
    assert q[0, 0] == 0.0 and q[0, 15] == 1.0
    assert q[0, 30] == pytest.approx(13 * 10 / 160**2)
    # a zero-width box has no block: padding only, no NaN
    z = pfan_positions(np.array([[5.0, 5.0, 5.0, 50.0]]), np.array([160.0, 160.0]))
    assert (z[0, :15] == 256).all() and (z[0, 15:30] == 0).all()


def test_positions_reproduce_the_authors_released_rows():
    """Boxes found to match 70 rows of the authors' released F30K position file (fixtures
    README): the rows come out exactly, in the authors' slot order. Most rows keep 15 of more
    than 15 tied whole blocks, so any other tie order changes which blocks survive."""
    rel = load_fixture("pfan_release_boxes")
    rows = load_fixture("pfan_enc")["positions"][rel["image"], rel["region"]]  # [70, 30]
    p = pfan_positions(rel["boxes"][None], rel["img_size"][None])[0]
    np.testing.assert_array_equal(p[:, :15], rows[:, :15])
    np.testing.assert_allclose(p[:, 15:30], rows[:, 15:30], rtol=0, atol=1e-8)

    # a stable tie order (what a careful re-implementation would do) keeps other blocks
    import itm.data.pfan as pfan

    def stable_top(ov, top):
        return np.argsort(ov, kind="stable")[::-1][:top]

    original = pfan._top_blocks
    try:
        pfan._top_blocks = stable_top
        q = pfan_positions(rel["boxes"][None], rel["img_size"][None])[0]
    finally:
        pfan._top_blocks = original
    other_set = sum(set(a[:15]) != set(b[:15]) for a, b in zip(q, rows, strict=True))
    assert other_set > 50


def test_positions_bad_input():
    with pytest.raises(ValueError, match=r"\[N, K, 4\]"):
        pfan_positions(np.zeros((2, 3, 5)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="img_sizes must be"):
        pfan_positions(np.zeros((2, 3, 4)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="positive"):
        pfan_positions(np.zeros((1, 3, 4)), np.array([[0.0, 5.0]]))
    with pytest.raises(ValueError, match="left of / above"):
        pfan_positions(np.array([[[-50.0, 0.0, 10.0, 10.0]]]), np.array([[160.0, 160.0]]))


# --- the encoder --------------------------------------------------------------------------------


def _fixture_encoder(dtype=torch.float64):
    f = load_fixture("pfan_enc")
    enc = PFANImageEncoder(
        int(f["img_dim"]), int(f["embed_size"]), int(f["grid"]), int(f["top_blocks"]),
        int(f["pos_dim"]),
    )  # fmt: skip
    # the contract names <- the authors' state_dict names (docs/pfan.md)
    names = {"fc": "fc", "fc_att": "fc_att", "pos_embed": "position_embedding"}
    state = {
        f"{ours}.{p}": torch.as_tensor(f[f"{theirs}.{p}"])
        for ours, theirs in names.items()
        for p in ("weight", "bias")
        if f"{theirs}.{p}" in f
    }
    enc.to(dtype).load_state_dict(state)  # cast first: loading keeps the parameters' dtype
    return enc.eval(), f


def test_encoder_parameter_names_and_init():
    enc = PFANImageEncoder(img_dim=40, embed_size=24, pos_dim=8)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == {
        "fc.weight": (24, 48),
        "fc.bias": (24,),
        "fc_att.weight": (8, 40),
        "fc_att.bias": (8,),
        "pos_embed.weight": (257, 8),
    }
    bound = (6 / (40 + 8 + 24)) ** 0.5  # Xavier over both fan-ins
    assert enc.fc.weight.abs().max() <= bound and (enc.fc.bias == 0).all()
    assert declared_inputs(enc) == ("positions",)


def test_encoder_fixture_float64():
    enc, f = _fixture_encoder()
    x, lens, pos = (torch.as_tensor(f[k]) for k in ("images", "img_lens", "positions"))
    with torch.no_grad():
        out = enc(x, lens, positions=pos)
        a, beta = enc.block_attention(x, lens, pos)
    np.testing.assert_allclose(out.numpy(), f["img_emb"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.numpy(), f["position_attention"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(beta.numpy(), f["block_weights"], rtol=0, atol=1e-9)
    # the second softmax acts on products <= 1: block weights stay near uniform (1/15)
    assert float(beta.min()) > 0.06 and float(beta.max()) < 0.075


def test_encoder_fixture_float32():
    enc, f = _fixture_encoder(torch.float32)
    x, lens, pos = (torch.as_tensor(f[k]) for k in ("images", "img_lens", "positions"))
    with torch.no_grad():
        out = enc(x.float(), lens, positions=pos.float())
    np.testing.assert_allclose(out.numpy(), f["img_emb"], rtol=0, atol=1e-5)


def test_encoder_ignores_padded_regions_and_extra_columns():
    enc, f = _fixture_encoder()
    x, pos = torch.as_tensor(f["images"]).clone(), torch.as_tensor(f["positions"]).clone()
    lens = torch.tensor([36, 20, 7])
    with torch.no_grad():
        ref = [enc(x[i : i + 1, :n], lens[i : i + 1], positions=pos[i : i + 1, :n]) for i, n in
               enumerate(lens.tolist())]  # fmt: skip
        for i, n in enumerate(lens.tolist()):
            x[i, n:] = torch.randn(36 - n, x.shape[2]) * 50
            pos[i, n:, :15] = torch.tensor([1e6, -7.0, 3000.5, 257.0, 9.9e9] * 3)  # out of range
            pos[i, n:, 15:] = 1e4
        # a 31st column (the COCO files' area) is ignored
        wide = torch.cat([pos, torch.rand(3, 36, 1) * 100], dim=2)
        out = enc(x, lens, positions=wide)
    assert torch.isfinite(out).all()
    for i, n in enumerate(lens.tolist()):
        np.testing.assert_allclose(out[i, :n].numpy(), ref[i][0].numpy(), rtol=0, atol=1e-12)


def test_encoder_bad_positions():
    enc, f = _fixture_encoder()
    x, lens, pos = (torch.as_tensor(f[k]) for k in ("images", "img_lens", "positions"))
    with pytest.raises(ValueError, match="needs positions"):
        enc(x, lens)
    with pytest.raises(ValueError, match="at least 30"):
        enc(x, lens, positions=pos[..., :20])
    bad = pos.clone()
    bad[1, 3, 2] = 300.0  # a VALID region with an index past the padding block
    with pytest.raises(ValueError, match=r"0\.\.256"):
        enc(x, lens, positions=bad)


def test_encoder_region_drop_drops_the_same_position_rows():
    enc, f = _fixture_encoder()
    enc.region_drop = 0.5
    x, pos = torch.as_tensor(f["images"]), torch.as_tensor(f["positions"])
    lens = torch.tensor([36, 30, 12])
    enc.train()
    torch.manual_seed(3)
    out, new_lens = enc(x, lens, positions=pos)
    torch.manual_seed(3)  # the same draw, replayed on the pair (features, positions)
    (x2, pos2), lens2 = drop_region_rows((x, pos), lens, 0.5)
    assert torch.equal(new_lens, lens2) and (new_lens < lens).all()
    enc.eval()
    with torch.no_grad():
        ref = enc(x2, lens2, positions=pos2)
    for i, n in enumerate(lens2.tolist()):
        np.testing.assert_allclose(out[i, :n].detach().numpy(), ref[i, :n].numpy(), atol=1e-12)
    # rows stay paired: a region's features and position row move together
    marks = torch.arange(36.0)[None, :, None].expand(3, 36, 1)
    torch.manual_seed(5)
    (m1, m2), kept = drop_region_rows((marks.clone(), marks.clone() * 2), lens, 0.5)
    assert torch.equal(m2, m1 * 2)


# --- data serving -------------------------------------------------------------------------------


def test_synthetic_positions_served_only_when_asked():
    dm = SyntheticDataModule(n_train=40, n_dev=10, n_test=10, n_regions=6, img_dim=8)
    batch = next(iter(dm.train_dataloader()))
    assert "positions" not in batch
    dm.image_inputs = ("positions",)
    batch = next(iter(dm.train_dataloader()))
    b = batch["images"].shape[0]
    assert batch["positions"].shape == (b, 6, 31) and batch["positions"].dtype == torch.float32
    store = dm.get_split("train")
    ids = batch["img_ids"]
    np.testing.assert_array_equal(batch["positions"].numpy(), store.positions[ids.numpy()])
    imgs = next(iter(dm.eval_dataloaders("test")[0]))
    assert imgs["positions"].shape == (10, 6, 31)
    # the synthetic boxes live in their own random stream: the features are unchanged by them
    from itm.data import generate_synthetic

    s = generate_synthetic(5, seed=(0, 1), n_regions=6, img_dim=8)
    assert s.region_boxes.shape == (5, 6, 4) and s.img_sizes.shape == (5, 2)
    assert s.positions.shape == (5, 6, 31)
    idx = s.positions[..., :15]
    assert ((idx >= 0) & (idx <= 256)).all() and (idx == np.round(idx)).all()


def test_collate_pads_positions_like_images():
    items = [
        {"image": torch.ones(n, 3), "img_id": i, "extras": {"positions": torch.full((n, 31), i)}}
        for i, n in enumerate((4, 2))
    ]
    b = collate_images(items)
    assert b["positions"].shape == (2, 4, 31) and b["img_lens"].tolist() == [4, 2]
    assert (b["positions"][1, :2] == 1).all()


def test_module_passes_declared_inputs(compose):
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    cfg = compose(
        ["model/image_encoder=pfan", "model.embed_size=16", "model.image_encoder.pos_dim=8",
         "model.text_encoder.word_dim=8", "data.n_train=20", "data.n_dev=10", "data.n_test=10"]
    )  # fmt: skip
    dm = build_datamodule(cfg)
    assert dm.image_inputs == ("positions",)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    batch = next(iter(dm.train_dataloader()))
    sims = model(batch)
    b = batch["images"].shape[0]
    assert sims.shape == (b, b) and torch.isfinite(sims).all()
    batch.pop("positions")
    with pytest.raises(ValueError, match="positions"):
        model(batch)


def test_precomp_released_positions_accepted(tmp_path, caplog):
    root = write_precomp(tmp_path / "d")
    n, k = np.load(root / "train_ims.npy", mmap_mode="r").shape[:2]
    rows = np.zeros((n, k, 30))
    rows[..., :15] = 256
    np.save(root / "train_boxes.npy", rows)  # the authors' release: positions named boxes
    from itm.data import PrecompDataModule

    dm = PrecompDataModule(root, splits=["train"])
    with (
        caplog.at_level(logging.WARNING, logger="itm.data.stores.npy"),
        pytest.warns(DataWarning, match="PFAN position rows"),
    ):
        store = dm.get_split("train")
    assert store.boxes is None and store.positions.shape == (n, k, 30)
    assert "PFAN position rows" in caplog.text and "train_boxes.npy" in caplog.text
    np.save(root / "train_boxes.npy", np.zeros((n, k, 7)))
    with pytest.raises(DataError, match="30 | 31"):
        PrecompDataModule(root, splits=["train"]).get_split("train")


def test_precomp_missing_positions_is_a_clear_error(tmp_path):
    root = write_precomp(tmp_path / "d")
    from itm.data import PrecompDataModule

    dm = PrecompDataModule(root)
    dm.image_inputs = ("positions",)
    with pytest.raises(DataError, match="itm-prepare pfan-positions"):
        dm.setup("fit")


def test_prepare_pfan_positions(tmp_path, capsys):
    from itm.data import PrecompDataModule
    from itm.data.prepare import main

    root = write_precomp(tmp_path / "d")
    n, k = np.load(root / "train_ims.npy", mmap_mode="r").shape[:2]
    rng = np.random.default_rng(0)
    lo = rng.random((n, k, 2)) * [600, 400]
    boxes = np.concatenate([lo, lo + rng.random((n, k, 2)) * [640, 480]], axis=2)  # some past
    np.save(root / "train_boxes.npy", boxes.astype(np.float32))  # the image edge
    assert main(["pfan-positions", str(root), "--splits", "train"]) == 2
    assert "train_img_sizes.npy" in capsys.readouterr().err
    sizes = np.tile([[480.0, 640.0]], (n, 1))
    np.save(root / "train_img_sizes.npy", sizes)
    assert main(["pfan-positions", str(root), "--splits", "train"]) == 0
    written = np.load(root / "train_positions.npy")
    expected = pfan_positions(np.load(root / "train_boxes.npy"), sizes)
    np.testing.assert_array_equal(written, expected)
    assert main(["pfan-positions", str(root), "--splits", "train"]) == 2  # no --force
    store = PrecompDataModule(root, splits=["train"]).get_split("train")
    assert store.positions.shape == written.shape and store.boxes.shape[2] == 4
    # a released position file under the boxes name is reported and left alone
    np.save(
        root / "dev_boxes.npy", written[:1].repeat(len(np.load(root / "dev_ims.npy")), 0)[..., :30]
    )
    assert main(["pfan-positions", str(root), "--splits", "dev"]) == 0
    assert "authors' release" in capsys.readouterr().out
    assert not (root / "dev_positions.npy").exists()


# --- SCAN's max_attn_bonus (PFAN's extra t2i term) ----------------------------------------------


def _bonus_sim(direction="t2i", bonus=0.5, pooling=None):
    from itm.models import Similarity
    from itm.models.align.scan import SCAN
    from itm.models.pooling import LSEPool

    return Similarity(SCAN(direction, 9.0, "clipped_l2norm", bonus), pooling or LSEPool(6.0))


@pytest.mark.parametrize("captions_key", ["captions", "captions_zero_pad"])
def test_max_attn_bonus_fixture(captions_key):
    f = load_fixture("pfan_t2i_lse")
    assert float(f["max_attn_weight"]) == 0.5 and str(f["agg_func"]) == "LogSumExp"
    img, cap, cl = (torch.as_tensor(f[k]) for k in ("images", captions_key, "cap_lens"))
    il = torch.full((img.shape[0],), img.shape[1])
    sim = _bonus_sim()
    np.testing.assert_allclose(sim(img, il, cap, cl).detach().numpy(), f["sims"], atol=1e-9)
    # the engine path (block-wise, in place) gives the same matrix, float64 and float32
    np.testing.assert_allclose(sim.score_matrix(img, il, cap, cl).numpy(), f["sims"], atol=1e-9)
    s32 = sim.score_matrix(img.float(), il, cap.float(), cl, max_block_mb=0.001)
    np.testing.assert_allclose(s32.numpy(), f["sims"], rtol=0, atol=1e-5)
    # the term itself: each word's largest attention weight over the regions
    from itm.models.align.attention import region_word_scores, t2i_weights
    from itm.models.functional import lengths_to_mask

    s = region_word_scores(img, cap)
    alpha = t2i_weights(s, lengths_to_mask(il, 5), lengths_to_mask(cl, 6), "clipped_l2norm", 9.0)
    peak = alpha.amax(dim=1)  # [img, cap, word]
    for j, n in enumerate(f["cap_lens"]):
        np.testing.assert_allclose(peak[:, j, :n].numpy(), f["max_attn"][j, :, :n], atol=1e-9)


def test_max_attn_bonus_t2i_part_only_and_pooled_like_the_main_term():
    from itm.models.pooling import AvgPool

    f = load_fixture("pfan_t2i_lse")
    img, cap, cl = (torch.as_tensor(f[k]) for k in ("images", "captions", "cap_lens"))
    il = torch.tensor([5, 3, 4])
    img = img.clone()
    img[1, 3:] = 40.0  # garbage in padded regions
    img[2, 4:] = -9.0
    for pooling in (None, AvgPool()):
        plain = _bonus_sim("t2i", 0.0, pooling)(img, il, cap, cl)
        with_bonus = _bonus_sim("t2i", 0.5, pooling)(img, il, cap, cl)
        both_plain = _bonus_sim("both", 0.0, pooling)(img, il, cap, cl)
        both_bonus = _bonus_sim("both", 0.5, pooling)
        # `both` gains exactly the t2i part's bonus
        torch.testing.assert_close(both_bonus(img, il, cap, cl) - both_plain, with_bonus - plain)
        torch.testing.assert_close(
            both_bonus.score_matrix(img, il, cap, cl), both_bonus(img, il, cap, cl)
        )
    # under avg the bonus is the mean peak weight: at most 1, at least 1 / n_regions
    mean_peak = (_bonus_sim("t2i", 1.0, AvgPool())(img, il, cap, cl) - plain).detach()
    assert (mean_peak <= 1).all() and (mean_peak >= 1 / il[:, None]).all()
    i2t = _bonus_sim("i2t", 0.5)(img, il, cap, cl)
    torch.testing.assert_close(i2t, _bonus_sim("i2t", 0.0)(img, il, cap, cl))


def test_max_attn_bonus_gradients_finite():
    f = load_fixture("pfan_t2i_lse")
    img = torch.as_tensor(f["images"]).clone().requires_grad_(True)
    cap = torch.as_tensor(f["captions"]).clone().requires_grad_(True)
    il = torch.tensor([5, 2, 4])
    _bonus_sim()(img, il, cap, torch.as_tensor(f["cap_lens"])).sum().backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(cap.grad).all()
    assert (img.grad[1, 2:] == 0).all()  # padded regions get no gradient


def test_positions_beside_an_h5_store(tmp_path):
    from itm.data import PrecompDataModule
    from itm.data.prepare import main

    root = write_precomp(tmp_path / "d")
    n, k = np.load(root / "train_ims.npy", mmap_mode="r").shape[:2]
    rows = np.zeros((n, k, 31))
    rows[..., :15] = 256
    np.save(root / "train_positions.npy", rows)
    assert main(["h5", str(root), "--splits", "train"]) == 0
    store = PrecompDataModule(root, format="h5", splits=["train"], n_train=3).get_split("train")
    assert store.format == "h5" and store.positions.shape == (3, k, 31)


def test_alignment_picture_of_a_pfan_model(compose):
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule
    from itm.viz import attention_map

    cfg = compose(
        ["model/image_encoder=pfan", "model.embed_size=16", "model.image_encoder.pos_dim=8",
         "model.text_encoder.word_dim=8", "data.n_train=20", "data.n_dev=10", "data.n_test=10"]
    )  # fmt: skip
    dm = build_datamodule(cfg)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    store = dm.get_split("dev")
    ids = dm.vocab.encode(store.captions[0])
    att = attention_map(
        model, store.images[0], None, ids, None, image_inputs={"positions": store.positions[0]}
    )
    assert att.shape == (len(ids), store.images.shape[1]) and np.isfinite(att).all()


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.align.max_attn_bonus=0.5", "pooling=avg"),
        ("model.align.max_attn_bonus=0.5", "model.align.direction=both", "pooling=lse"),
    ],
)
def test_max_attn_bonus_passes_the_head_conformance_checks(overrides):
    import conformance as C

    C.check_head(C.build_head("scan", overrides=overrides))
