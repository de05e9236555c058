"""Evaluation of saved checkpoints: ``evaluate(cfg) -> metrics`` (``eval.py`` / ``itm-eval``).

    python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
    python eval.py ckpt_path=... data=coco eval.protocol=coco1k+5k
    python eval.py 'ckpt_path=[a.ckpt,b.ckpt]'                 # ensemble: averaged matrices
    python eval.py ckpt_path=a.ckpt eval.save_matrix=true       # also writes sims_0.npy
                                                                # (ensembles: sims_ensemble.npy)
    python eval.py 'eval.matrices=[run1/sims_0.npy,run2/sims_0.npy]'   # ensemble saved ones
    python eval.py ckpt_path=... eval.rerank.method=mtfn        # + MTFN re-ranked figures

Each checkpoint is rebuilt from the model config it carries (``hyper_parameters.cfg``, read
with ``weights_only=True`` by :func:`itm.checkpoint.read_checkpoint_file`, never unpickled in
full), every image and caption of the split is encoded ONCE, and the full
``[N_img, N_cap]`` matrix is scored by ``Similarity.score_matrix`` under ``eval.max_block_mb``.
The data: ``data=...`` when given, otherwise the data config of the checkpoint's own run
(``.hydra/config.yaml`` in a parent folder of the checkpoint). Results (R@1/5/10, medr, meanr per
direction, rsum; COCO 1K = the 5-fold mean with rsum summed from the averaged recalls) are
printed and written atomically to ``results.json`` and ``results.md`` in the output folder.

``eval.rerank.method=mtfn`` adds the figures of MTFN's re-ranking of the same (ensembled)
matrix, re-ranked inside each COCO 1K fold (:mod:`itm.metrics.rerank`): a second table per
protocol, ``rerank`` in ``results.json``, ``... rr`` rows in ``results.md`` and ``rr_*`` keys in
the returned dict. With ``eval.rerank.t2i=oracle_groups`` (the released script's t2i variant,
which reads the test set's ground-truth caption groups) every one of those outputs says ORACLE.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from itm.data.build import build_datamodule
from itm.io import atomic_write
from itm.metrics import PROTOCOLS, RerankSpec, ensemble, evaluate_protocol
from itm.metrics.recall import METRIC_KEYS
from itm.utils import format_metrics_table

log = logging.getLogger(__name__)

__all__ = ["encode_split", "evaluate", "load_checkpoint", "score_checkpoint"]


# --- checkpoints and data ---------------------------------------------------------------------


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild an :class:`~itm.models.module.ITMModule` from a checkpoint, weights loaded, in
    eval mode (``eval.py``, the notebooks).

    The file is read once by :func:`itm.checkpoint.read_checkpoint_file` (``weights_only=True``;
    never a full unpickling). An itm checkpoint is rebuilt from the model config it carries
    (``hyper_parameters.cfg``); an authors' checkpoint (SCAN, BFAN, IMRAM, CHAN, VSE-infinity,
    SGRAF) is converted by :mod:`itm.released`. Anything else raises a one-line
    :class:`~itm.checkpoint.CheckpointError` naming the file and ``itm-prepare convert``.
    """
    from itm.checkpoint import read_checkpoint_file
    from itm.models.encoders.glove import without_word_vectors
    from itm.models.module import ITMModule
    from itm.released import released_or_itm

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    found = released_or_itm(read_checkpoint_file(path), path)
    if not isinstance(found, Mapping):  # an authors' checkpoint, converted
        log.info("%s", found.summary())
        return found.build_model().to(device).eval()
    model = ITMModule(without_word_vectors(found["hyper_parameters"]["cfg"]))
    model.load_state_dict(found["state_dict"])
    return model.to(device).eval()


def run_config(ckpt: str | Path) -> DictConfig | None:
    """The Hydra config of the run that wrote ``ckpt`` (``.hydra/config.yaml`` in a parent)."""
    for parent in list(Path(ckpt).resolve().parents)[:4]:
        candidate = parent / ".hydra" / "config.yaml"
        if candidate.is_file():
            return OmegaConf.load(candidate)
    return None


def data_config(cfg: DictConfig, ckpt: str | Path | None) -> DictConfig:
    """``cfg.data`` when given, else the data node of the checkpoint's run."""
    if cfg.get("data") is not None:
        return cfg.data
    run = run_config(ckpt) if ckpt is not None else None
    if run is None or run.get("data") is None:
        raise ValueError(
            f"no data config: pass data=... (synthetic | f30k | coco | precomp), or keep the "
            f"checkpoint inside its run folder (with .hydra/config.yaml); checkpoint: {ckpt}"
        )
    data = run.data
    if "paths" in run and "paths" in cfg:  # the run's paths may point elsewhere: keep ours
        merged = OmegaConf.merge({"paths": cfg.paths}, {"data": data})
        return merged.data
    return data


def _accepts_splits(data_cfg: DictConfig) -> bool:
    """Whether the data config's ``_target_`` class takes a ``splits`` argument."""
    import inspect

    from itm.models.schema import resolve_target

    target = data_cfg.get("_target_")
    cls = resolve_target(str(target)) if target else None
    if cls is None:
        return "splits" in data_cfg
    try:
        return "splits" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return "splits" in data_cfg


def build_data(
    cfg: DictConfig, data_cfg: DictConfig, model_cfg: Mapping[str, Any], split: str | None = None
):
    """The data module (:func:`itm.data.build.build_datamodule`); with ``split``, only that
    split is read and validated, whatever the data config's (or its run's) ``splits`` say: an
    evaluation never opens the train split (a NaN-scan of ~33 GB on COCO), and an evaluation
    folder may hold nothing else."""
    only = {"splits": [split]} if split and _accepts_splits(data_cfg) else {}
    dm = build_datamodule(data_cfg, model_cfg, **only)
    if cfg.eval.get("batch_size"):
        dm.eval_batch_size = int(cfg.eval.batch_size)
    return dm


class DataCache:
    """The data modules of one evaluation, shared by the checkpoints of an ensemble that read
    the same data the same way (equal data config, tokenizer and per-region inputs): each
    split is opened and validated once, not once per ensemble member."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}

    def get(self, cfg: DictConfig, data_cfg: DictConfig, model_cfg: Mapping[str, Any], split: str):
        text = model_cfg.get("text_encoder", {}) or {}
        image = model_cfg.get("image_encoder", {}) or {}
        key = json.dumps(
            [
                OmegaConf.to_container(data_cfg, resolve=True),
                text.get("_target_"),  # the tokenizer the text encoder brings
                text.get("path"),
                image.get("_target_"),
                split,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self._modules:
            self._modules[key] = build_data(cfg, data_cfg, model_cfg, split)
        return self._modules[key]


# --- encoding and scoring ----------------------------------------------------------------------


@torch.no_grad()
def encode_split(model, dm, split: str) -> dict[str, torch.Tensor]:
    """Encode every image and caption of ``split`` once, in dataset order."""
    from itm.models.module import pad_cat

    device = next(model.parameters()).device
    img_loader, cap_loader = dm.eval_dataloaders(split)
    imgs, img_lens, caps, cap_lens, cap_img = [], [], [], [], []
    for b in img_loader:
        extra = {k: v.to(device) for k, v in model.image_inputs(b).items()}
        emb, lens = model.encode_images(b["images"].to(device), b["img_lens"].to(device), **extra)
        imgs.append(emb)
        img_lens.append(lens)
    for b in cap_loader:
        emb, lens = model.encode_captions(b["captions"].to(device), b["cap_lens"].to(device))
        caps.append(emb)
        cap_lens.append(lens)
        cap_img.append(b["cap_img_ids"])
    return {
        "img": pad_cat(imgs),
        "img_lens": torch.cat(img_lens),
        "cap": pad_cat(caps),
        "cap_lens": torch.cat(cap_lens),
        "cap_to_img": torch.cat(cap_img),
    }


def score_checkpoint(
    ckpt: str | Path, cfg: DictConfig, split: str, device: str, data: DataCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(sims [N_img, N_cap] float32, cap_to_img [N_cap])`` of one checkpoint; ``data``
    shares the data modules between the checkpoints of an ensemble."""
    model = load_checkpoint(ckpt, device)
    dm = (data or DataCache()).get(cfg, data_config(cfg, ckpt), model.cfg, split)
    t0 = time.perf_counter()
    e = encode_split(model, dm, split)
    t1 = time.perf_counter()
    sims = model.similarity.score_matrix(
        e["img"],
        e["img_lens"],
        e["cap"],
        e["cap_lens"],
        float(cfg.eval.max_block_mb),
        precision=str(cfg.eval.get("precision") or "fp32"),
        exact_top=int(cfg.eval.get("bf16_exact_top", 10)),
    )
    t2 = time.perf_counter()
    n_img, n_cap = sims.shape
    log.info(
        "%s: encoded %d images + %d captions in %.1f s, scored %d pairs in %.1f s (%.0f pairs/s)",
        ckpt,
        n_img,
        n_cap,
        t1 - t0,
        n_img * n_cap,
        t2 - t1,
        n_img * n_cap / max(t2 - t1, 1e-9),
    )
    return sims.float().cpu().numpy(), e["cap_to_img"].cpu().numpy()


# --- results -----------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``array`` to ``path`` as ``.npy``, atomically (a file object: np.save would append
    ".npy" to a name)."""
    with atomic_write(path) as fh:
        np.save(fh, array)


def _save_text(path: Path, text: str) -> None:
    """``text`` to ``path`` (UTF-8), atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def results_markdown(results: Mapping[str, Any], title: str) -> str:
    """A Markdown table: one row per protocol, R@1/5/10, medr, meanr per direction, rsum."""
    cols = [k for k in METRIC_KEYS]
    lines = [f"# {title}", "", "| protocol | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in cols) + " |")
    return "\n".join(lines) + "\n"


def _protocol_results(
    sims: np.ndarray, protocol: str, cfg: DictConfig, rerank: RerankSpec | None = None
) -> dict[str, dict]:
    """``{protocol name: metrics}`` (coco1k+5k gives two entries); with ``rerank``, the
    figures of the MTFN-re-ranked orders."""
    text_sims = rerank.load_text_sims() if rerank is not None else None
    if text_sims is not None and tuple(text_sims.shape) != (sims.shape[1],) * 2:
        raise ValueError(
            f"eval.rerank.text_sims={rerank.text_sims}: shape {tuple(text_sims.shape)}, "
            f"expected [{sims.shape[1]}, {sims.shape[1]}] (the captions of the split)"
        )
    out = evaluate_protocol(
        sims,
        protocol,
        int(cfg.eval.captions_per_image),
        fold_images=int(cfg.eval.fold_images),
        rerank=rerank,
        text_sims=text_sims,
    )
    if protocol == "coco1k+5k":
        return {"coco1k": out["coco1k"], "coco5k": out["coco5k"]}
    return {protocol: out}


def resolve_protocol(cfg: DictConfig) -> str:
    """``protocol=`` (the issue's spelling) overrides ``eval.protocol``."""
    protocol = cfg.get("protocol") or cfg.eval.get("protocol") or "f30k"
    protocol = str(protocol).strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return protocol


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate one checkpoint, an ensemble of checkpoints and / or saved score matrices.

    Returns a flat dict ``{"<protocol>/<metric>": value}`` (e.g. ``f30k/rsum``); writes
    ``results.json`` (also per-fold COCO 1K figures), ``results.md`` and, with
    ``eval.save_matrix``, one ``sims_<i>.npy`` per checkpoint to ``eval.output_dir``.
    """
    protocol = resolve_protocol(cfg)
    rerank = RerankSpec.from_config(cfg.eval.get("rerank"))  # checked before any scoring
    ckpts = _as_list(cfg.get("ckpt_path"))
    saved = _as_list(cfg.eval.get("matrices"))
    if not ckpts and not saved:
        raise ValueError("nothing to evaluate: pass ckpt_path=... and / or eval.matrices=[...]")
    split = cfg.eval.get("split") or ("testall" if protocol.startswith("coco") else "test")
    device = str(cfg.eval.get("device") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(cfg.eval.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    matrices, sources, mapping = [], [], None
    data = DataCache()
    for i, ckpt in enumerate(ckpts):
        sims, cap_to_img = score_checkpoint(ckpt, cfg, split, device, data)
        mapping = cap_to_img if mapping is None else mapping
        if not np.array_equal(mapping, cap_to_img):
            raise ValueError(f"{ckpt}: its data differs from the first checkpoint's")
        if cfg.eval.get("save_matrix"):
            path = out_dir / f"sims_{i}.npy"
            _save_npy(path, sims)
            log.info("saved the score matrix of %s to %s", ckpt, path)
        matrices.append(sims)
        sources.append(str(ckpt))
    for path in saved:
        m = np.load(path, mmap_mode="r")
        matrices.append(np.asarray(m, dtype=np.float32))
        sources.append(str(path))
    cpi = int(cfg.eval.captions_per_image)
    if mapping is not None:
        expected = np.arange(len(mapping)) // cpi
        if not np.array_equal(mapping, expected):
            raise ValueError(
                f"the evaluation protocols expect caption c to belong to image c // {cpi} "
                "(the public file order); this split is laid out differently"
            )
    sims = ensemble(matrices) if len(matrices) > 1 else matrices[0]
    if len(matrices) > 1 and cfg.eval.get("save_matrix"):  # the averaged matrix that is ranked
        path = out_dir / "sims_ensemble.npy"
        _save_npy(path, np.asarray(sims))
        log.info("saved the ensemble's score matrix to %s", path)
    results = _protocol_results(sims, protocol, cfg)

    title = "ensemble of " + ", ".join(sources) if len(sources) > 1 else sources[0]
    for name, metrics in results.items():
        log.info("\n%s", format_metrics_table(metrics, title=name))
    reranked = _protocol_results(sims, protocol, cfg, rerank) if rerank is not None else {}
    rr_tag = "rr ORACLE" if rerank is not None and rerank.oracle else "rr"
    for name, metrics in reranked.items():
        log.info("\n%s\n%s", rerank.label, format_metrics_table(metrics, title=f"{name} {rr_tag}"))
    log.info("(%s; split %s; %d images x %d captions)", title, split, *sims.shape)
    payload = {
        "protocol": protocol,
        "split": split,
        "sources": sources,
        "shape": list(sims.shape),
        "results": results,
    }
    if rerank is not None:
        payload["rerank"] = {
            "method": "mtfn",
            "k_i2t": rerank.k_i2t,
            "k_t2i": rerank.k_t2i,
            "t2i": rerank.t2i,
            "text_sims": rerank.text_sims,
            "oracle": rerank.oracle,
            "label": rerank.label,
            "results": reranked,
        }
    _save_text(out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    md = {name: m for name, m in results.items()}
    md.update({f"{name} {rr_tag}": m for name, m in reranked.items()})
    md_text = results_markdown(md, title)
    if rerank is not None:
        md_text += f"\n{rr_tag} = {rerank.label}\n"
    _save_text(out_dir / "results.md", md_text)
    log.info("results: %s, %s", out_dir / "results.json", out_dir / "results.md")
    flat = {f"{name}/{k}": float(m[k]) for name, m in results.items() for k in METRIC_KEYS}
    for name, m in reranked.items():
        flat.update({f"{name}/rr_{k}": float(m[k]) for k in METRIC_KEYS})
        if rerank.oracle:
            flat[f"{name}/rr_oracle"] = 1.0
    return flat


def with_output_dir(cfg: DictConfig, output_dir: str) -> DictConfig:
    """Set ``eval.output_dir`` when unset (the Hydra run folder)."""
    if not cfg.eval.get("output_dir"):
        with open_dict(cfg):
            cfg.eval.output_dir = output_dir
    return cfg
