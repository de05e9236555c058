"""The authors' own checkpoints (itm.released): evaluated exactly, converted, refused safely.

Three complete cases were made by the authors' code (tests/data/released/README.md): the
checkpoint in the authors' format, and ``expected.npz``, the score matrix the authors' own
evaluation computed from it on a 6-image split. Every other format is tested on files written
here in the same layout (legacy torch pickle, an argparse.Namespace opt, the authors' key
names), built from the cases' weights with other options, and checked against naive NumPy
references of the authors' scoring on the authors' own encoder outputs (``img_emb`` /
``cap_emb`` of the cases).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as ref
from conftest import ROOT, run_train_cli
from itm.checkpoint import CheckpointError
from itm.evaluate import evaluate, load_checkpoint
from itm.metrics import recall_at_k
from itm.released import FORMATS, load_released
from itm.released.base import read_checkpoint
from itm.released.convert import RELEASED_KEY, convert_file

RELEASED = Path(__file__).resolve().parent / "data" / "released"
SHARED = ("test_ims.npy", "test_caps.txt", "f30k_precomp_vocab.json")
CASES = {
    "scan_t2i_lse": "model_best.pth.tar",
    "imram_full": "model_best.pth.tar",
    "chan_bigru": "model_best.pth",
}
ATOL = 1e-5


def expected(case: str) -> dict[str, np.ndarray]:
    with np.load(RELEASED / case / "expected.npz") as e:
        return {k: e[k] for k in e.files}


def case_folder(root: Path, name: str) -> Path:
    """A release folder: the shared 6-image split and vocabulary (linked, not copied)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in SHARED:
        if not (folder / f).exists():
            (folder / f).symlink_to(RELEASED / f)
    return folder


def shared_case(root: Path, case: str) -> Path:
    """The case folder with its authors' checkpoint; returns the checkpoint path."""
    folder = case_folder(root, case)
    ckpt = folder / CASES[case]
    if not ckpt.exists():
        ckpt.symlink_to(RELEASED / case / CASES[case])
    return ckpt


def authors(case: str) -> dict:
    """A shared case's checkpoint as loaded (opt as a plain dict)."""
    ckpt = read_checkpoint(RELEASED / case / CASES[case])
    return {**ckpt, "opt": dict(vars(ckpt["opt"]))}


def save_authors(path: Path, model, opt: dict, epoch: int = 12) -> Path:
    """Write a checkpoint as the authors' save_checkpoint did (legacy pickle, Namespace opt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "model": model,
        "best_rsum": 401.5,
        "opt": argparse.Namespace(**opt),
        "Eiters": 4321,
    }
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def run_eval(compose, folder: Path, ckpts: list[Path], out: Path) -> dict[str, float]:
    arg = str(ckpts[0]) if len(ckpts) == 1 else "[" + ",".join(str(c) for c in ckpts) + "]"
    cfg = compose(
        [
            f"ckpt_path={arg}",
            "data=precomp",
            f"data.root={folder}",
            f"data.vocab_path={folder / 'f30k_precomp_vocab.json'}",
            "eval.save_matrix=true",
            f"eval.output_dir={out}",
        ],
        config_name="eval",
    )
    return evaluate(cfg)


def sims_of(out: Path, i: int = 0) -> np.ndarray:
    return np.load(out / f"sims_{i}.npy")


# --- the authors' cases, through eval ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_shared_case_reproduces_the_authors_matrix(compose, tmp_path, case):
    ckpt = shared_case(tmp_path, case)
    assert not zipfile.is_zipfile(ckpt)  # the legacy (pre-zip) torch format
    metrics = run_eval(compose, ckpt.parent, [ckpt], tmp_path / "out")
    e = expected(case)
    sims = sims_of(tmp_path / "out")
    assert sims.shape == (6, 30) and sims.dtype == np.float32
    np.testing.assert_allclose(sims, e["sims"], rtol=0, atol=ATOL)
    assert metrics["f30k/rsum"] == pytest.approx(recall_at_k(sims)["rsum"])


def test_eval_cli_on_an_authors_checkpoint(tmp_path):
    """The documented command line, in a fresh process."""
    ckpt = shared_case(tmp_path, "scan_t2i_lse")
    folder = ckpt.parent
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={ckpt}",
            "data=precomp",
            f"data.root={folder}",
            f"data.vocab_path={folder / 'f30k_precomp_vocab.json'}",
            "eval.save_matrix=true",
            f"eval.output_dir={tmp_path / 'out'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(
        sims_of(tmp_path / "out"), expected("scan_t2i_lse")["sims"], rtol=0, atol=ATOL
    )


def test_the_case_encoders_match_the_authors_outputs():
    """Encoders vs the authors' encode_data outputs (localises a mismatch: encoder vs head)."""
    from itm.data.vocab import Vocabulary

    images = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
    vocab = Vocabulary.from_json(RELEASED / "f30k_precomp_vocab.json")
    captions = (RELEASED / "test_caps.txt").read_text().splitlines()
    ids = [vocab.encode(c) for c in captions]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.int64)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    lens = torch.tensor([len(r) for r in ids])
    for case, name in CASES.items():
        model = load_released(RELEASED / case / name).build_model().eval()
        e = expected(case)
        with torch.no_grad():
            img, _ = model.encode_images(images, torch.full((6,), 36))
            cap, _ = model.encode_captions(tokens, lens)
        np.testing.assert_allclose(img.numpy(), e["img_emb"], rtol=0, atol=ATOL, err_msg=case)
        np.testing.assert_allclose(
            cap.numpy()[:, : e["cap_emb"].shape[1]], e["cap_emb"], rtol=0, atol=ATOL, err_msg=case
        )


# --- naive references of the authors' scoring ----------------------------------------------------


def _embeddings(case: str):
    e = expected(case)
    img = e["img_emb"].astype(np.float64)
    cap = e["cap_emb"].astype(np.float64)
    return img, [36] * len(img), cap, e["cap_lens"].tolist()


def bfan_reference(img, img_lens, cap, cap_lens, focal: str, lam: float) -> np.ndarray:
    """BFAN: focal attention both ways (clipped_l2norm), t2i mean + i2t mean, pair by pair."""

    def part(query, context):
        w, _ = ref.attend(query, context, "clipped_l2norm", lam)  # [query, context]
        s = context.shape[0]
        if focal == "equal":
            f = s * w - w.sum(1, keepdims=True)
        else:
            f = w * np.sqrt(w).sum(1, keepdims=True) - (w**1.5).sum(1, keepdims=True)
        h = np.where(f > 0, w, 0.0)
        h = h / h.sum(1, keepdims=True)
        return ref.cosine(query, h @ context).mean()

    out = np.zeros((len(img), len(cap)))
    for i in range(len(img)):
        v = img[i, : img_lens[i]]
        for j in range(len(cap)):
            e = cap[j, : cap_lens[j]]
            out[i, j] = part(e, v) + part(v, e)
    return out


def imram_reference(img, cap, cap_lens, weights: dict, direction: str, steps: int, lam: float):
    """IMRAM: per step, attention of the memory over the original context, mean cosine of the
    ORIGINAL queries with the attended vectors, memory update [q ; att] -> gate / candidate."""

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    def branch(query, context, name):
        wg, bg = weights[f"gate_{name}.weight"], weights[f"gate_{name}.bias"]
        wc, bc = weights[f"linear_{name}.weight"], weights[f"linear_{name}.bias"]
        memory, total = query, 0.0
        for _ in range(steps):
            _, att = ref.attend(memory, context, "clipped_l2norm", lam)
            total += ref.cosine(query, att).mean()
            z = np.concatenate([memory, att], axis=1)
            g = sigmoid(z @ wg.T + bg)
            memory = g * memory + (1 - g) * np.tanh(z @ wc.T + bc)
        return total

    out = np.zeros((len(img), len(cap)))
    for i in range(len(img)):
        v = img[i]
        for j in range(len(cap)):
            e = cap[j, : cap_lens[j]]
            if direction in ("t2i", "both"):
                out[i, j] += branch(e, v, "t2i")
            if direction in ("i2t", "both"):
                out[i, j] += branch(v, e, "i2t")
    return out


def chan_reference(img, cap, cap_lens, coding: str, pooling: str, lam: float = 10.0):
    """CHAN hard assignment: per word the max over regions (VHA) or per region the max over
    words (THA), pooled; LSE without the 1/lambda rescale."""
    out = np.zeros((len(img), len(cap)))
    for i in range(len(img)):
        for j in range(len(cap)):
            s = img[i] @ cap[j, : cap_lens[j]].T  # [regions, words]
            x = s.max(0) if coding == "VHA" else s.max(1)
            out[i, j] = {
                "lse": lambda x: np.log(np.exp(lam * x).sum()),
                "avg": np.mean,
                "max": np.max,
                "sum": np.sum,
            }[pooling](x)
    return out


def test_references_reproduce_the_shared_cases():
    """The naive references agree with the authors' own matrices where a case exists."""
    img, img_lens, cap, cap_lens = _embeddings("scan_t2i_lse")
    s = ref.scan_scores(img, img_lens, cap, cap_lens, "t2i", 9.0, "clipped_l2norm", "lse", 6.0)
    np.testing.assert_allclose(s, expected("scan_t2i_lse")["sims"], atol=ATOL)
    img, _, cap, cap_lens = _embeddings("imram_full")
    w = {k[len("module.") :]: v.double().numpy() for k, v in authors("imram_full")["model"].items()}
    s = imram_reference(img, cap, cap_lens, w, "both", 3, 9.0)
    np.testing.assert_allclose(s, expected("imram_full")["sims"], atol=ATOL)
    img, _, cap, cap_lens = _embeddings("chan_bigru")
    s = chan_reference(img, cap, cap_lens, "VHA", "lse")
    np.testing.assert_allclose(s, expected("chan_bigru")["sims"], atol=ATOL)


# --- every other format, on files written here -----------------------------------------------------

SCAN_VARIANTS = {
    # name: (cross_attn, agg_func, lambda_softmax, lambda_lse, reference pooling)
    "scan_t2i_avg": ("t2i", "Mean", 9.0, 6.0, "avg"),
    "scan_i2t_lse": ("i2t", "LogSumExp", 4.0, 5.0, "lse"),
    "scan_i2t_avg": ("i2t", "Mean", 4.0, 6.0, "avg"),
    "scan_t2i_max": ("t2i", "Max", 9.0, 6.0, "max"),
}


def write_scan(folder: Path, name: str) -> Path:
    cross, agg, lam, lam_lse, _ = SCAN_VARIANTS[name]
    base = authors("scan_t2i_lse")
    opt = {**base["opt"], "cross_attn": cross, "agg_func": agg}
    opt.update(lambda_softmax=lam, lambda_lse=lam_lse)
    return save_authors(folder / f"{name}.pth.tar", base["model"], opt)


def scan_expected(name: str) -> np.ndarray:
    cross, _, lam, lam_lse, pooling = SCAN_VARIANTS[name]
    img, img_lens, cap, cap_lens = _embeddings("scan_t2i_lse")
    return ref.scan_scores(
        img, img_lens, cap, cap_lens, cross, lam, "clipped_l2norm", pooling, lam_lse
    )


@pytest.mark.parametrize("name", list(SCAN_VARIANTS))
def test_scan_variants(compose, tmp_path, name):
    folder = case_folder(tmp_path, "data")
    ckpt = write_scan(folder, name)
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    np.testing.assert_allclose(sims_of(tmp_path / "out"), scan_expected(name), rtol=0, atol=ATOL)


def test_scan_weight_norm_encoder_folds(compose, tmp_path):
    """--precomp_enc_type=weight_norm stores fc.weight_g / fc.weight_v (dim=None)."""
    base = authors("scan_t2i_lse")
    img = dict(base["model"][0])
    w = img.pop("fc.weight")
    g = torch.tensor(3.5)
    img["fc.weight_g"], img["fc.weight_v"] = g, w * 7.0 / g
    opt = {**base["opt"], "precomp_enc_type": "weight_norm"}
    folder = case_folder(tmp_path, "data")
    # W = g v / ||v||: with v = 7 W / g, W' = g * (7 W / g) / (7 ||W|| / g) = g W / ||W||
    scale = float(g) / float(torch.linalg.vector_norm(w))
    ckpt = save_authors(folder / "wn.pth.tar", [img, base["model"][1]], opt)
    released = load_released(ckpt)
    torch.testing.assert_close(released.state_dict["image_encoder.fc.weight"], w * scale)
    assert "fc.weight_g" in " ".join(released.dropped)
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    assert np.isfinite(sims_of(tmp_path / "out")).all()


BFAN_OPT = {
    "data_path": "./data/",
    "data_name": "f30k_precomp",
    "vocab_path": "./vocab/",
    "margin": 0.2,
    "num_epochs": 30,
    "batch_size": 128,
    "word_dim": 16,
    "embed_size": 16,
    "grad_clip": 2.0,
    "num_layers": 1,
    "learning_rate": 0.0002,
    "lr_update": 15,
    "workers": 10,
    "log_step": 100,
    "val_step": 1500,
    "logger_name": "./runs/runX/log",
    "model_name": "./runs/runX/checkpoint",
    "resume": "",
    "max_violation": True,
    "img_dim": 2048,
    "no_imgnorm": False,
    "no_txtnorm": False,
    "precomp_enc_type": "basic",
    "lambda_softmax": 20.0,
    "focal_type": "equal",
    "vocab_size": 135,
}


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_bfan(compose, tmp_path, focal):
    """BFAN's layout is SCAN's (fc; embed, a bidirectional rnn): the SCAN case's weights under
    BFAN's options."""
    folder = case_folder(tmp_path, "data")
    model = authors("scan_t2i_lse")["model"]
    ckpt = save_authors(folder / f"bfan_{focal}.pth.tar", model, {**BFAN_OPT, "focal_type": focal})
    released = load_released(ckpt)
    assert released.format == "BFAN" and released.model_cfg["align"]["focal"] == focal
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    img, img_lens, cap, cap_lens = _embeddings("scan_t2i_lse")
    want = bfan_reference(img, img_lens, cap, cap_lens, focal, 20.0)
    np.testing.assert_allclose(sims_of(tmp_path / "out"), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("mode", "direction"), [("text_IMRAM", "t2i"), ("image_IMRAM", "i2t")])
def test_imram_single_direction(compose, tmp_path, mode, direction):
    """Every IMRAM file holds both memory units; a single-direction model drops the other."""
    base = authors("imram_full")
    folder = case_folder(tmp_path, "data")
    ckpt = save_authors(
        folder / f"{mode}.pth.tar", base["model"], {**base["opt"], "model_mode": mode}
    )
    released = load_released(ckpt)
    other = "i2t" if direction == "t2i" else "t2i"
    assert not any(f"mdu_{other}" in k for k in released.state_dict)
    assert any(f"linear_{other}" in k for k in released.dropped)
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    img, _, cap, cap_lens = _embeddings("imram_full")
    w = {k[len("module.") :]: v.double().numpy() for k, v in base["model"].items()}
    want = imram_reference(img, cap, cap_lens, w, direction, 3, 9.0)
    np.testing.assert_allclose(sims_of(tmp_path / "out"), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("coding", "pooling_type", "pooling"),
    [("VHACoding", "LSEPooling", "lse"), ("THACoding", "MeanPooling", "avg")],
)
def test_chan_basic_image_encoder(compose, tmp_path, coding, pooling_type, pooling):
    """``--precomp_enc_type=basic`` (fc only): the CHAN case's weights without the attention."""
    base = authors("chan_bigru")
    img = {k: v for k, v in base["model"][0].items() if k.startswith("fc.")}
    opt = {**base["opt"], "precomp_enc_type": "basic", "coding_type": coding}
    opt["pooling_type"] = pooling_type
    folder = case_folder(tmp_path, "data")
    ckpt = save_authors(folder / "chan_basic.pth", [img, *base["model"][1:]], opt)
    released = load_released(ckpt)
    assert released.model_cfg["image_encoder"]["_target_"].endswith("FCImageEncoder")
    assert released.model_cfg["text_encoder"]["vocab_size"] == 135  # the <mask> row dropped
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    v = np.load(RELEASED / "test_ims.npy").astype(np.float64)
    x = v @ img["fc.weight"].double().numpy().T + img["fc.bias"].double().numpy()
    x /= np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8
    _, _, cap, cap_lens = _embeddings("chan_bigru")
    want = chan_reference(x, cap, cap_lens, coding[:3], pooling)
    np.testing.assert_allclose(sims_of(tmp_path / "out"), want, rtol=0, atol=ATOL)


VSE_OPT = {
    "data_path": "./data/",
    "data_name": "f30k_precomp",
    "vocab_path": "./vocab/",
    "margin": 0.2,
    "num_epochs": 25,
    "batch_size": 128,
    "word_dim": 8,
    "embed_size": 8,
    "grad_clip": 2.0,
    "learning_rate": 0.0005,
    "lr_update": 15,
    "optim": "adam",
    "workers": 10,
    "log_step": 10,
    "val_step": 500,
    "logger_name": "runs/f30k_butd_region_bigru/log",
    "model_name": "runs/f30k_butd_region_bigru",
    "resume": "",
    "max_violation": True,
    "img_dim": 2048,
    "no_imgnorm": False,
    "no_txtnorm": False,
    "precomp_enc_type": "basic",
    "backbone_path": "",
    "backbone_source": "detector",
    "vse_mean_warmup_epochs": 1,
    "reset_start_epoch": False,
    "backbone_warmup_epochs": 5,
    "embedding_warmup_epochs": 2,
    "backbone_lr_factor": 0.01,
    "input_scale_factor": 1,
    "drop": True,
    "vocab_size": 136,
}


def _gru(gen, prefix: str, n_in: int, hidden: int) -> dict[str, torch.Tensor]:
    out = {}
    for suffix in ("", "_reverse"):
        out[f"{prefix}weight_ih_l0{suffix}"] = torch.randn(3 * hidden, n_in, generator=gen) * 0.3
        out[f"{prefix}weight_hh_l0{suffix}"] = torch.randn(3 * hidden, hidden, generator=gen) * 0.3
        out[f"{prefix}bias_ih_l0{suffix}"] = torch.randn(3 * hidden, generator=gen) * 0.1
        out[f"{prefix}bias_hh_l0{suffix}"] = torch.randn(3 * hidden, generator=gen) * 0.1
    return out


def vse_infty_model(d: int = 8, wd: int = 8, vocab: int = 136):
    """Random weights in VSE-infinity's region + BiGRU layout."""
    gen = torch.Generator().manual_seed(501)

    def bn(n):
        return {
            "weight": torch.rand(n, generator=gen) + 0.5,
            "bias": torch.randn(n, generator=gen) * 0.2,
            "running_mean": torch.randn(n, generator=gen) * 0.2,
            "running_var": torch.rand(n, generator=gen) + 0.5,
            "num_batches_tracked": torch.tensor(17),
        }

    img = {
        "fc.weight": torch.randn(d, 2048, generator=gen) * 0.03,
        "fc.bias": torch.randn(d, generator=gen) * 0.1,
        "mlp.layers.0.weight": torch.randn(d // 2, 2048, generator=gen) * 0.03,
        "mlp.layers.0.bias": torch.randn(d // 2, generator=gen) * 0.1,
        "mlp.layers.1.weight": torch.randn(d, d // 2, generator=gen) * 0.3,
        "mlp.layers.1.bias": torch.randn(d, generator=gen) * 0.1,
        **{f"mlp.bns.0.{k}": v for k, v in bn(d // 2).items()},
        **{f"mlp.bns.1.{k}": v for k, v in bn(d).items()},
        **_gru(gen, "gpool.gru.", 32, 32),
        "gpool.linear.weight": torch.randn(1, 32, generator=gen) * 0.3,
    }
    txt = {
        "embed.weight": torch.randn(vocab, wd, generator=gen) * 0.3,
        **_gru(gen, "rnn.", wd, d),
        **_gru(gen, "gpool.gru.", 32, 32),
        "gpool.linear.weight": torch.randn(1, 32, generator=gen) * 0.3,
    }
    return [img, txt]


def vse_infty_expected(model) -> np.ndarray:
    """The VSE-infinity score built by hand from the authors' tensors: fc + residual MLP (eval
    BatchNorm), GPO over regions; embedding + BiGRU, GPO over words; l2n; dot product."""
    from itm.data.vocab import Vocabulary
    from itm.models.encoders import BiGRUTextEncoder, MLPImageEncoder
    from itm.models.pooling import GPOPool

    img_w, txt_w = model
    enc = MLPImageEncoder(2048, 8, norm=False).eval()
    enc.fc.load_state_dict({"weight": img_w["fc.weight"], "bias": img_w["fc.bias"]})
    for src, dst in (
        ("mlp.layers.0.", enc.mlp[0]),
        ("mlp.bns.0.", enc.mlp[1]),
        ("mlp.layers.1.", enc.mlp[3]),
    ):
        dst.load_state_dict({k[len(src) :]: v for k, v in img_w.items() if k.startswith(src)})
    text = BiGRUTextEncoder(135, 8, 8, norm=False).eval()
    text.embed.weight.data.copy_(txt_w["embed.weight"][:135])
    text.rnn.load_state_dict({k[4:]: v for k, v in txt_w.items() if k.startswith("rnn.")})
    pools = []
    for w in (img_w, txt_w):
        pool = GPOPool(32, 32, 0.1).eval()
        pool.gru.load_state_dict(
            {k[len("gpool.gru.") :]: v for k, v in w.items() if k.startswith("gpool.gru.")}
        )
        pool.scorer.weight.data.copy_(w["gpool.linear.weight"])
        pools.append(pool)
    vocab = Vocabulary.from_json(RELEASED / "f30k_precomp_vocab.json")
    ids = [vocab.encode(c) for c in (RELEASED / "test_caps.txt").read_text().splitlines()]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.int64)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    lens = torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        ims = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
        x = enc(ims, torch.full((6,), 36))
        pos = torch.arange(36)
        vi = pools[0](x, (pos[None] < 36).expand(6, 36)).double().numpy()
        y = text(tokens, lens)
        ti = pools[1](y, torch.arange(y.shape[1])[None] < lens[:, None]).double().numpy()
    vi /= np.linalg.norm(vi, axis=-1, keepdims=True)
    ti /= np.linalg.norm(ti, axis=-1, keepdims=True)
    return vi @ ti.T


def test_vse_infty_bigru(compose, tmp_path):
    folder = case_folder(tmp_path, "data")
    model = vse_infty_model()
    ckpt = save_authors(folder / "model_best.pth", model, VSE_OPT)
    released = load_released(ckpt)
    assert released.format == "VSE-infinity"
    assert "model[0][mlp.bns.1.weight]" in released.dropped  # never applied by the authors
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    np.testing.assert_allclose(
        sims_of(tmp_path / "out"), vse_infty_expected(model), rtol=0, atol=ATOL
    )


# --- SGRAF ------------------------------------------------------------------------------------------

SGRAF_OPT = {
    "data_path": "./data/",
    "data_name": "f30k_precomp",
    "vocab_path": "./vocab/",
    "model_name": "./runs/f30k_SGR/checkpoint",
    "logger_name": "./runs/f30k_SGR/log",
    "num_epochs": 40,
    "batch_size": 128,
    "word_dim": 16,
    "embed_size": 16,
    "sim_dim": 8,
    "num_layers": 1,
    "bi_gru": True,
    "no_imgnorm": False,
    "no_txtnorm": False,
    "img_dim": 2048,
    "workers": 10,
    "learning_rate": 0.0002,
    "lr_update": 30,
    "log_step": 10,
    "val_step": 500,
    "grad_clip": 2.0,
    "margin": 0.2,
    "max_violation": True,
    "module_name": "SGR",
    "sgr_step": 3,
    "resume": "",
    "vocab_size": 135,
}


def sgraf_model(module: str, d: int = 16, m: int = 8, steps: int = 3):
    """Random weights in SGRAF's layout ([img_enc, txt_enc, EncoderSimilarity])."""
    gen = torch.Generator().manual_seed(601 if module == "SGR" else 602)

    def lin(name, n_out, n_in, scale=0.3):
        return {
            f"{name}.weight": torch.randn(n_out, n_in, generator=gen) * scale,
            f"{name}.bias": torch.randn(n_out, generator=gen) * 0.1,
        }

    def bn(name, n):
        return {
            f"{name}.weight": torch.rand(n, generator=gen) + 0.5,
            f"{name}.bias": torch.randn(n, generator=gen) * 0.2,
            f"{name}.running_mean": torch.randn(n, generator=gen) * 0.2,
            f"{name}.running_var": torch.rand(n, generator=gen) + 0.5,
            f"{name}.num_batches_tracked": torch.tensor(17),
        }

    img = lin("fc", d, 2048, 0.03)
    txt = {"embed.weight": torch.randn(135, d, generator=gen) * 0.3, **_gru(gen, "cap_rnn.", d, d)}
    head = {
        **lin("v_global_w.embedding_local.0", d, d),
        **bn("v_global_w.embedding_local.1", 36),
        **lin("v_global_w.embedding_global.0", d, d),
        **bn("v_global_w.embedding_global.1", d),
        **lin("v_global_w.embedding_common.0", 1, d),
        **lin("t_global_w.embedding_local.0", d, d),
        **lin("t_global_w.embedding_global.0", d, d),
        **lin("t_global_w.embedding_common.0", 1, d),
        **lin("sim_tranloc_w", m, d),
        **lin("sim_tranglo_w", m, d),
        **lin("sim_eval_w", 1, m),
    }
    if module == "SGR":
        for k in range(steps):
            head.update(lin(f"SGR_module.{k}.graph_query_w", m, m, 1.2))  # x4 as the fixtures
            head.update(lin(f"SGR_module.{k}.graph_key_w", m, m, 1.2))
            head.update(lin(f"SGR_module.{k}.sim_graph_w", m, m))
    else:
        head.update(lin("SAF_module.attn_sim_w", 1, m))
        head.update(bn("SAF_module.bn", 1))
    return [img, txt, head]


def test_sgraf_mapping_names_the_contract():
    """The SGRAF mapping by the architecture contract's names (no head needed to check it)."""
    from itm.released import sgraf

    renamed = dict(sgraf.HEAD_RENAMES + sgraf.graph_renames(3))
    assert renamed["v_global_w.embedding_local.0."] == "img_global.local_fc."
    assert renamed["v_global_w.embedding_local.1."] == "img_global.local_bn."
    assert renamed["SGR_module.2.graph_query_w."] == "sgr.2.query."
    assert renamed["SGR_module.0.sim_graph_w."] == "sgr.0.graph."
    assert renamed["SAF_module.bn."] == "saf.bn."
    for module in ("SGR", "SAF"):
        for key in sgraf_model(module)[2]:
            assert any(key.startswith(a) for a in renamed), key


def _sgraf_head_available() -> bool:
    try:
        import itm.models.align.sgraf  # noqa: F401
    except ImportError:
        return False
    return (ROOT / "conf" / "model" / "align" / "sgraf.yaml").is_file()


needs_sgraf = pytest.mark.skipif(
    not _sgraf_head_available(),
    reason="the SGRAF head (itm.models.align.sgraf with conf/model/align/sgraf.yaml) is not on "
    "this branch yet",
)


def sgraf_expected(model, opt) -> np.ndarray:
    """The SGRAF score by the contract names, weights assigned here (not by the converter)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule

    module = opt["module_name"].lower()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=[
                "model/align=sgraf",
                f"model.align.module={module}",
                "model.align.sim_dim=8",
                "model.embed_size=16",
                "model.text_encoder.word_dim=16",
                "model.text_encoder.vocab_size=135",
            ],
        )
    GlobalHydra.instance().clear()
    net = ITMModule(OmegaConf.to_container(cfg.model, resolve=True)).eval()
    img, txt, head = model
    state = {"image_encoder.fc." + k[3:]: v for k, v in img.items()}
    state["text_encoder.embed.weight"] = txt["embed.weight"]
    state.update(
        {"text_encoder.rnn." + k[8:]: v for k, v in txt.items() if k.startswith("cap_rnn.")}
    )
    names = {
        "v_global_w.embedding_local.0": "img_global.local_fc",
        "v_global_w.embedding_local.1": "img_global.local_bn",
        "v_global_w.embedding_global.0": "img_global.global_fc",
        "v_global_w.embedding_global.1": "img_global.global_bn",
        "v_global_w.embedding_common.0": "img_global.common_fc",
        "t_global_w.embedding_local.0": "txt_global.local_fc",
        "t_global_w.embedding_global.0": "txt_global.global_fc",
        "t_global_w.embedding_common.0": "txt_global.common_fc",
        "sim_tranloc_w": "sim_local",
        "sim_tranglo_w": "sim_global",
        "sim_eval_w": "sim_eval",
        "SAF_module.attn_sim_w": "saf.attn",
        "SAF_module.bn": "saf.bn",
        **{f"SGR_module.{k}.graph_query_w": f"sgr.{k}.query" for k in range(3)},
        **{f"SGR_module.{k}.graph_key_w": f"sgr.{k}.key" for k in range(3)},
        **{f"SGR_module.{k}.sim_graph_w": f"sgr.{k}.graph" for k in range(3)},
    }
    for key, value in head.items():
        stem, leaf = key.rsplit(".", 1)
        state[f"similarity.align.{names[stem]}.{leaf}"] = value
    net.load_state_dict(state, strict=True)
    from itm.data.vocab import Vocabulary

    vocab = Vocabulary.from_json(RELEASED / "f30k_precomp_vocab.json")
    ids = [vocab.encode(c) for c in (RELEASED / "test_caps.txt").read_text().splitlines()]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.int64)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    lens = torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        ims = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
        v, vl = net.encode_images(ims, torch.full((6,), 36))
        c, cl = net.encode_captions(tokens, lens)
        return net.similarity(v, vl, c, cl).double().numpy()


@needs_sgraf
@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_sgraf(compose, tmp_path, module):
    folder = case_folder(tmp_path, "data")
    model, opt = sgraf_model(module), {**SGRAF_OPT, "module_name": module}
    ckpt = save_authors(folder / f"sgraf_{module}.pth.tar", model, opt)
    run_eval(compose, folder, [ckpt], tmp_path / "out")
    np.testing.assert_allclose(
        sims_of(tmp_path / "out"), sgraf_expected(model, opt), rtol=0, atol=ATOL
    )


@needs_sgraf
def test_sgraf_ensemble(compose, tmp_path):
    """SGRAF's row: the mean of the SGR and the SAF models' matrices."""
    folder = case_folder(tmp_path, "data")
    ckpts, want = [], []
    for module in ("SGR", "SAF"):
        model, opt = sgraf_model(module), {**SGRAF_OPT, "module_name": module}
        ckpts.append(save_authors(folder / f"sgraf_{module}.pth.tar", model, opt))
        want.append(sgraf_expected(model, opt))
    metrics = run_eval(compose, folder, ckpts, tmp_path / "out")
    for i in range(2):
        np.testing.assert_allclose(sims_of(tmp_path / "out", i), want[i], rtol=0, atol=ATOL)
    mean = (sims_of(tmp_path / "out", 0) + sims_of(tmp_path / "out", 1)) / 2
    assert metrics["f30k/rsum"] == pytest.approx(recall_at_k(mean)["rsum"])


# --- ensembles -------------------------------------------------------------------------------------


def test_scan_ensemble_t2i_avg_plus_i2t_lse(compose, tmp_path):
    """SCAN's headline "t-i AVG + i-t LSE": ckpt_path=[a,b] averages the two matrices."""
    folder = case_folder(tmp_path, "data")
    a, b = write_scan(folder, "scan_t2i_avg"), write_scan(folder, "scan_i2t_lse")
    metrics = run_eval(compose, folder, [a, b], tmp_path / "out")
    s0, s1 = sims_of(tmp_path / "out", 0), sims_of(tmp_path / "out", 1)
    np.testing.assert_allclose(s0, scan_expected("scan_t2i_avg"), rtol=0, atol=ATOL)
    np.testing.assert_allclose(s1, scan_expected("scan_i2t_lse"), rtol=0, atol=ATOL)
    mean = (scan_expected("scan_t2i_avg") + scan_expected("scan_i2t_lse")) / 2
    assert metrics["f30k/rsum"] == pytest.approx(recall_at_k(mean)["rsum"])
    saved_mean = np.load(tmp_path / "out" / "sims_ensemble.npy")
    np.testing.assert_allclose(saved_mean, mean, rtol=0, atol=ATOL)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sources"] == [str(a), str(b)]


# --- safety: what is refused, and how -------------------------------------------------------------


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_hostile_pickle_is_refused_without_running(tmp_path, legacy):
    marker = tmp_path / "ran"
    bad = tmp_path / "model_best.pth.tar"
    torch.save(
        {"model": [{}, {}], "opt": _RunsCode(marker), "epoch": 1},
        bad,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match=r"refused.*(posix|os|nt)\.system") as err:
        load_released(bad)
    assert str(bad) in str(err.value)
    # the evaluation's loader refuses it too (before any fallback could unpickle it)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_plain_weights_only_refuses_the_authors_files_and_ours_reads_them():
    """Why the one allowed class is needed: torch's default refuses the Namespace."""
    path = RELEASED / "scan_t2i_lse" / CASES["scan_t2i_lse"]
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    assert isinstance(read_checkpoint(path)["opt"], argparse.Namespace)


def test_unknown_kind_names_what_was_found(tmp_path):
    odd = tmp_path / "odd.pth"
    torch.save({"model": {"encoder.w": torch.zeros(2)}, "opt": argparse.Namespace(foo=1)}, odd)
    with pytest.raises(
        CheckpointError,
        match=r"no kind itm reads: found a dict with keys \['model', 'opt'\]; 'model' is a dict of 1 entries \['encoder.w'\]",
    ):
        load_released(odd)
    plain = tmp_path / "plain.pt"
    torch.save([torch.zeros(3)], plain)
    with pytest.raises(CheckpointError, match=r"found a list of 1 \(a tensor of shape \[3\]\)"):
        load_released(plain)
    for fmt in FORMATS:  # every format is named in the message
        with pytest.raises(CheckpointError, match=fmt.FORMAT):
            load_released(plain)


def test_damaged_and_empty_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_released(empty)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((RELEASED / "scan_t2i_lse" / CASES["scan_t2i_lse"]).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_released(cut)


def test_unsupported_options_are_named(tmp_path):
    base = authors("scan_t2i_lse")
    bad = save_authors(
        tmp_path / "l1.pth.tar", base["model"], {**base["opt"], "raw_feature_norm": "l1norm"}
    )
    with pytest.raises(CheckpointError, match=r"raw_feature_norm='l1norm'.*clipped_l2norm"):
        load_released(bad)
    chan = authors("chan_bigru")
    soft = save_authors(
        tmp_path / "vsa.pth", chan["model"], {**chan["opt"], "coding_type": "VSACoding"}
    )
    with pytest.raises(CheckpointError, match="coding_type='VSACoding'"):
        load_released(soft)
    # a weight the format does not know (another layout) is named
    odd_model = [{**base["model"][0], "fc2.weight": torch.zeros(2)}, base["model"][1]]
    odd = save_authors(tmp_path / "odd.pth.tar", odd_model, base["opt"])
    with pytest.raises(CheckpointError, match=r"model\[0\]\['fc2.weight'\]"):
        load_released(odd)


def test_itm_checkpoints_pass_through(tmp_path):
    path = tmp_path / "itm.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": {}}}, path)
    assert load_released(path) is None


# --- conversion -------------------------------------------------------------------------------------


def test_convert_evaluates_the_same_and_loads_weights_only(compose, tmp_path):
    src = shared_case(tmp_path, "chan_bigru")
    out = tmp_path / "chan.ckpt"
    released = convert_file(src, out)
    assert zipfile.is_zipfile(out)
    ckpt = torch.load(out, weights_only=True)  # no class allowed beyond torch's defaults
    meta = ckpt[RELEASED_KEY]
    assert meta["format"] == "CHAN" and meta["epoch"] == 21
    assert meta["overrides"] == released.overrides and "experiment=chan_bigru" in meta["overrides"]
    assert meta["mapped"]["coding_type"] == "model.align.direction=t2i"
    assert "alpha" in meta["unmapped"] and "row 135" in " ".join(meta["dropped"])
    assert ckpt["hyper_parameters"]["cfg"]["image_encoder"]["_target_"].endswith(
        "SelfAttentionImageEncoder"
    )
    with pytest.raises(FileExistsError):
        convert_file(src, out)
    run_eval(compose, src.parent, [out], tmp_path / "out")
    np.testing.assert_allclose(
        sims_of(tmp_path / "out"), expected("chan_bigru")["sims"], rtol=0, atol=ATOL
    )


def test_convert_cli_lists_the_options(tmp_path):
    src = shared_case(tmp_path, "scan_t2i_lse")
    from itm.data.prepare import main

    out = tmp_path / "scan.ckpt"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["convert", str(src), "--out", str(out)]) == 2  # exists, no --force
    assert main(["convert", str(out), "--out", str(tmp_path / "again.ckpt")]) == 2  # already itm


@pytest.mark.slow
def test_converted_checkpoint_fine_tunes_one_epoch(tmp_path):
    """``train.py <printed overrides> ckpt_path=<converted>`` resumes and trains an epoch."""
    src = shared_case(tmp_path, "scan_t2i_lse")
    out = tmp_path / "scan.ckpt"
    released = convert_file(src, out)
    data = tmp_path / "train_data"
    data.mkdir()
    for split in ("train", "dev", "test"):  # the 6-image split stands in for every split
        (data / f"{split}_ims.npy").symlink_to(RELEASED / "test_ims.npy")
        (data / f"{split}_caps.txt").symlink_to(RELEASED / "test_caps.txt")
    (data / "f30k_precomp_vocab.json").symlink_to(RELEASED / "f30k_precomp_vocab.json")
    overrides = [o for o in released.overrides if not o.startswith(("trainer.max_epochs", "data."))]
    run_train_cli(
        [
            *overrides,
            f"ckpt_path={out}",
            "data=precomp",
            f"data.root={data}",
            "data.batch_size=6",
            "trainer.max_epochs=1",
            "logger=none",
            "test=false",
        ],
        tmp_path,
    )
    (last,) = tmp_path.glob("train/runs/*/checkpoints/last.ckpt")
    trained = torch.load(last, weights_only=True)
    assert trained["epoch"] == 0 and trained["global_step"] == 5  # one epoch: 30 pairs / 6
    before = torch.load(out, weights_only=True)["state_dict"]["image_encoder.fc.weight"]
    assert not torch.equal(trained["state_dict"]["image_encoder.fc.weight"], before)


def test_chan_and_vse_infty_conversions_decay_the_lr_once(tmp_path):
    """The authors' adjust_learning_rate of CHAN / VSE-infinity: x0.1 once at lr_update; SCAN's
    every lr_update (StepLR)."""
    chan = load_released(RELEASED / "chan_bigru" / CASES["chan_bigru"])
    vse = load_released(save_authors(tmp_path / "vse.pth", vse_infty_model(), VSE_OPT))
    scan = load_released(RELEASED / "scan_t2i_lse" / CASES["scan_t2i_lse"])
    for released in (chan, vse):
        assert released.model_cfg["scheduler"]["_target_"] == "itm.models.schedule.decay_once"
        assert "model.scheduler._target_=itm.models.schedule.decay_once" in released.overrides
    assert scan.model_cfg["scheduler"]["_target_"] == "torch.optim.lr_scheduler.StepLR"
