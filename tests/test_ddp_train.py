"""DDP training on 2 CPU processes (gloo): the gathered loss equals the single-process loss of
the global batch (value and gradients), and ``trainer=ddp_sim`` multiruns give one clean
directory per job whose dev metrics equal a single-process evaluation of the checkpoint."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import run_train_cli

SIZES = (3, 4)  # per-rank batch sizes (unequal on purpose: last-batch shapes)
K, L, D = 5, 7, 8


def _world_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    return {
        "img": torch.randn(n, K, D, generator=g, dtype=torch.float64),
        "img_lens": torch.randint(2, K + 1, (n,), generator=g),
        "cap": torch.randn(n, L, D, generator=g, dtype=torch.float64),
        # rank 0's captions are shorter: the gather must pad the word axis
        "cap_lens": torch.tensor([3, 4, 2, 7, 5, 6, 7]),
        "ids": torch.arange(n),
    }


def _similarity():
    from itm.models import LSEPool, Similarity
    from itm.models.align.scan import SCAN

    return Similarity(SCAN(direction="both", lambda_softmax=4.0), LSEPool())


def _gather_fn(world: int):
    import torch.distributed.nn.functional as dist_nn

    def all_gather(t: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        if sync_grads:
            return torch.stack(dist_nn.all_gather(t))
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    return all_gather


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from itm.models.gather import gathered_contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = _world_batch()
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        l_max = int(b["cap_lens"][sl].max())  # each rank pads its captions to its own max
        sim = _similarity()
        out = {}
        for hardest in (True, False):
            img = b["img"][sl].clone().requires_grad_(True)
            cap = b["cap"][sl, :l_max].clone().requires_grad_(True)
            loss, n = gathered_contrastive_loss(
                sim,
                img,
                b["img_lens"][sl],
                cap,
                b["cap_lens"][sl],
                all_gather=_gather_fn(world),
                rank=rank,
                margin=0.2,
                max_violation=hardest,
                cap_ids=b["ids"][sl],
                img_ids=b["ids"][sl],
            )
            loss.backward()
            out[hardest] = (loss.detach(), img.grad, cap.grad, n)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's worker threads can still hold autograd work
    # of the differentiable all_gather then and abort the exit ("terminate called without an
    # active exception", SIGABRT; seen once in CI after the results were written).
    os._exit(0)


def test_gathered_loss_equals_global_batch_loss(tmp_path):
    """Summed over ranks the gathered loss is the single-process loss of the global batch, and
    each rank's embeddings receive exactly their gradient of that loss."""
    import torch.multiprocessing as mp

    from itm.models import ContrastiveLoss

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    b = _world_batch()
    sim = _similarity()
    for hardest in (True, False):
        img = b["img"].clone().requires_grad_(True)
        cap = b["cap"].clone().requires_grad_(True)
        full = ContrastiveLoss(margin=0.2, max_violation=hardest)(
            sim(img, b["img_lens"], cap, b["cap_lens"])
        )
        full.backward()
        ranks = [torch.load(tmp_path / f"rank{r}.pt")[hardest] for r in range(2)]
        assert all(r[3] == sum(SIZES) for r in ranks)
        torch.testing.assert_close(ranks[0][0] + ranks[1][0], full.detach())
        for r, (_, g_img, g_cap, _) in enumerate(ranks):
            lo = sum(SIZES[:r])
            sl = slice(lo, lo + SIZES[r])
            torch.testing.assert_close(g_img, img.grad[sl])
            torch.testing.assert_close(g_cap, cap.grad[sl, : g_cap.shape[1]])


def test_cross_rank_hinge_on_one_rank_is_contrastive_loss():
    from itm.models import ContrastiveLoss
    from itm.models.gather import cross_rank_hinge

    sims = torch.randn(6, 6, dtype=torch.float64)
    for hardest in (True, False):
        want = ContrastiveLoss(0.2, max_violation=hardest)(sims)
        torch.testing.assert_close(cross_rank_hinge(sims, sims, 0, 0.2, hardest), want)
    # rows 2..3 and columns 2..3 of the global matrix: that part of the loss
    part = cross_rank_hinge(sims[2:4], sims[:, 2:4], 2, 0.2, True)
    c = (0.2 + sims - sims.diagonal()[:, None]).clamp(min=0).fill_diagonal_(0)
    i = (0.2 + sims - sims.diagonal()[None, :]).clamp(min=0).fill_diagonal_(0)
    torch.testing.assert_close(part, c[2:4].max(1).values.sum() + i[:, 2:4].max(0).values.sum())


def _dev_rows(job: Path) -> dict[str, float]:
    with open(job / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("dev/rsum")]
    assert len(rows) == 1, rows
    return {k.split("/", 1)[1]: float(v) for k, v in rows[0].items() if k.startswith("dev/") and v}


def test_ddp_sim_multirun_dirs_and_metrics_equal_single_process(tmp_path):
    """``trainer=ddp_sim`` (2 gloo processes, Lightning's popen launcher) inside a multirun:
    exactly one sweep directory with one directory per job (no second sweep dir from rank 1),
    gathered-loss training runs, and each job's logged dev metrics equal a single-process
    evaluation of its checkpoint (15 dev images: the sampler pads one duplicate)."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    args = [
        "-m",
        "trainer=ddp_sim",
        "debug=fast",
        "model.embed_size=32",
        "model.text_encoder.word_dim=16",
        "data.n_dev=15",
        "model.loss_gather=false,true",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    run_train_cli(args, tmp_path)
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # rank 1 did not re-run the sweep elsewhere
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    assert not (tmp_path / "train" / "runs").exists()
    for job in jobs:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert cfg.trainer.devices == 2
        assert cfg.model.loss_gather == (job.name == "1")
        assert (job / "train_ddp_rank1.log").exists()  # rank 1 worked in the job's directory
        logged = _dev_rows(job)
        # the saved config without its Hydra-only interpolation (the output dir)
        cfg = OmegaConf.merge(cfg, {"paths": {"output_dir": str(tmp_path / "single")}})
        dm = build_datamodule(cfg)
        model = ITMModule.load_from_checkpoint(job / "checkpoints" / "last.ckpt", weights_only=True)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        out = trainer.validate(model, datamodule=dm, verbose=False)[0]
        single = {k.split("/", 1)[1]: float(v) for k, v in out.items()}
        assert single.keys() == logged.keys()
        for k, v in logged.items():
            assert single[k] == pytest.approx(v, abs=1e-4), (job.name, k, single[k], v)
