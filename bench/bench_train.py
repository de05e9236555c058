"""Training steps of the VSRN and SAEM recipes against their plain baselines, side by side.

One training step = ``ITMModule.training_step`` (encoders, scores, contrastive loss and the
recipe's auxiliary terms) + backward + the Adam step, on one batch of random Flickr30K-shaped
inputs (36 regions of 2048 features, captions of 8..20 tokens), float32, CPU. The models come
from the recipes' configs (``conf/experiment``) with a smaller joint space (``--dim``, default
512; the recipes use 2048 / 256) so that a row takes seconds. Rows, each against its baseline,
the two steps timed alternately (``--reps`` pairs after a warm-up pair; the ratio is the median
of the per-pair ratios):

- ``vsrn``: experiment=vsrn_f30k (GCN reasoning, GRU over regions, caption-generation loss)
  vs a plain VSE model with VSRN's caption side (``fc`` regions + mean, the one-directional GRU
  + last word, no aux loss);
- ``vsrn_nocap``: the same without the caption loss (what the reasoning alone costs);
- ``saem``: experiment=saem_f30k (self-attention over regions, angular loss, weight-norm
  penalty) vs ``fc`` regions + mean, no aux loss, no penalty. Both read captions with the same
  frozen BERT + CNN: a random BERT of ``--bert-layers`` x ``--bert-hidden`` (no weights are
  downloaded; bert-base is 12 x 768, whose frozen forward would weigh on both sides alike).

    python bench/run.py train               # or: make bench BENCH=train
    python bench/bench_train.py --quick     # small shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from itm.models.module import ITMModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(overrides: list[str]) -> ITMModule:
    """An ITMModule from ``conf/train.yaml`` with ``overrides``, in training mode."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    module = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    return module.train()


def write_bert(directory: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A randomly initialised BERT of the given size, saved for ``BertModel.from_pretrained``."""
    from transformers import BertConfig, BertModel

    words = [f"w{i}" for i in range(vocab - 5)]
    (directory / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


def batch(n: int, k: int, img_dim: int, vocab: int, start: int, end: int, seed: int = 0):
    """Random images and captions (8..20 tokens between ``start`` and ``end``, ids >= 5)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 21, (n,), generator=g)
    tokens = torch.randint(5, vocab, (n, int(lens.max())), generator=g)
    tokens[:, 0] = start
    tokens[torch.arange(n), lens - 1] = end
    return {
        "images": torch.randn(n, k, img_dim, generator=g),
        "img_lens": torch.full((n,), k),
        "captions": tokens,
        "cap_lens": lens,
        "img_ids": torch.arange(n),
        "cap_ids": torch.arange(n),
    }


def step_fn(module: ITMModule, data: dict):
    """One optimisation step of ``module`` on ``data`` (logging disabled)."""
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.log = lambda *args, **kwargs: None  # no trainer: nothing to log to
    module.optimizers = lambda: optimizer

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(data, 0).backward()
        optimizer.step()

    return step


def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(ours, base, reps: int) -> tuple[float, float, float]:
    """(best seconds of ``ours``, of ``base``, median of the per-pair ratios ours / base)."""
    timed(base), timed(ours)  # warm-up pair
    t_ours, t_base, ratios = [], [], []
    for _ in range(reps):
        b = timed(base)
        o = timed(ours)
        t_ours.append(o)
        t_base.append(b)
        ratios.append(o / b)
    ratios.sort()
    return min(t_ours), min(t_base), ratios[len(ratios) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512, help="joint embedding size d of every row")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--img-dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8000, help="caption vocabulary (F30K: ~8.5k)")
    p.add_argument("--bert-hidden", type=int, default=256)
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    a = p.parse_args([] if argv is None else argv)
    if a.quick:
        a.batch, a.dim, a.regions, a.img_dim, a.vocab, a.reps = 16, 64, 12, 64, 500, 1
        a.bert_hidden, a.bert_layers = 32, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [f"model.embed_size={a.dim}", f"model.image_encoder.img_dim={a.img_dim}"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, wall time; batch "
        f"{a.batch}, K={a.regions}, img_dim={a.img_dim}, d={a.dim}, vocab {a.vocab}; one step = "
        "training_step + backward + Adam step"
    )
    rows = []
    vocab = f"model.text_encoder.vocab_size={a.vocab}"
    vsrn = ["experiment=vsrn_f30k", *sizes, vocab]
    # VSE with VSRN's caption encoder: fc regions, mean, one-directional GRU, last word
    plain_vse = ["model/align=global", "pooling=avg", "text_pooling=last", *sizes, vocab]
    plain_vse.append("model.text_encoder.bidirectional=false")
    words = batch(a.batch, a.regions, a.img_dim, a.vocab, start=1, end=2)
    cases = [
        ("vsrn", vsrn, plain_vse, words, "VSE: fc + mean, same GRU text side, no aux"),
        ("vsrn_nocap", [*vsrn, "model/aux=none"], plain_vse, words, "the same VSE"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        bert = write_bert(Path(tmp), a.vocab, a.bert_hidden, a.bert_layers)
        saem = ["experiment=saem_f30k", *sizes, f"model.text_encoder.path={bert}"]
        plain_saem = ["model/text_encoder=bert_cnn", "model/align=global", "pooling=avg", *sizes]
        plain_saem.append(f"model.text_encoder.path={bert}")
        bert_ids = batch(a.batch, a.regions, a.img_dim, a.vocab, start=2, end=3, seed=1)
        cases.append(("saem", saem, plain_saem, bert_ids, "fc + mean, same BERT + CNN, no aux"))
        for name, ours_cfg, base_cfg, data, base_label in cases:
            ours, base = build(ours_cfg), build(base_cfg)
            t_ours, t_base, ratio = paired(step_fn(ours, data), step_fn(base, data), a.reps)
            rows.append((name, t_ours, t_base, ratio, base_label))
            print(f"  {name}: {t_ours:.2f} s vs {t_base:.2f} s", flush=True)
    hdr = f"{'row':<12}{'step s':>9}{'baseline s':>12}{'x baseline':>12}  baseline"
    print(hdr + "\n" + "-" * (len(hdr) + 28))
    for name, t_ours, t_base, ratio, label in rows:
        print(f"{name:<12}{t_ours:>9.2f}{t_base:>12.2f}{ratio:>11.2f}x  {label}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
