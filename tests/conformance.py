"""The conformance checks every alignment head, pooling and encoder passes by being configured.

A component is discovered from its config file (``conf/model/align/*.yaml``, ``conf/pooling/*.yaml``,
``conf/model/image_encoder/*.yaml``, ``conf/model/text_encoder/*.yaml``): adding a file there adds
it to ``tests/test_conformance.py`` with no test list to edit. Each ``check_*`` function raises
AssertionError on the first violated property and is also called on deliberately broken
components (``tests/test_conformance.py``), so the suite is shown to fail where it should.

What a head must satisfy (float64, small random sets; lengths include a one-region image and a
one-token caption; slots past a length hold GARBAGE):

- garbage padding scores exactly like zero padding (eval and train mode, same seed);
- no gradient reaches a padded slot;
- ``score_matrix`` equals the direct call at three memory budgets (down to one pair per block);
- train and eval mode agree when the head has no parameters and no buffers;
- float32 is close to float64;
- the peak memory of a block stays within the head's declared ``bytes_per_pair``;
- its alignment picture is ``[L, K]``, finite, and sums to 1 along its declared axis;
- bf16 scoring is close to float32, or refused with the head's name.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from itm.models import Similarity

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

#: joint embedding size of the conformance models
D = 16
#: the sets: image region counts (one one-region image) and caption lengths (one one-token)
IMG_LENS = (5, 1, 3, 5)
CAP_LENS = (6, 1, 4, 2, 6)
K, L = max(IMG_LENS), max(CAP_LENS)


def discover(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The option names of a config group: the stems of ``conf_dir/<group>/*.yaml``."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


@contextlib.contextmanager
def hydra_config(conf_dir: Path = CONF_DIR) -> Iterator[Callable[..., Any]]:
    """``compose(overrides) -> DictConfig`` of ``train.yaml`` in ``conf_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
            yield lambda overrides=(): compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def build_head(name: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()) -> Similarity:
    """``Similarity(align, pooling)`` of ``model/align=<name>`` with its own configured pooling,
    d = 16, in float64 and eval mode (parameters drawn with seed 0)."""
    from hydra.utils import instantiate

    with hydra_config(conf_dir) as compose:
        cfg = compose([f"model/align={name}", f"model.embed_size={D}", *overrides])
    torch.manual_seed(0)
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    return sim.double().eval()


def _lengths_mask(lens: tuple[int, ...], size: int) -> Tensor:
    return torch.arange(size)[None, :] < torch.tensor(lens)[:, None]


def head_inputs(seed: int = 0, garbage: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``img [4, 5, 16]``, ``img_lens``, ``cap [5, 6, 16]``, ``cap_lens`` (float64; unit-norm
    valid fragments, as the encoders give them; padded slots garbage or zero)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(len(IMG_LENS), K, D, generator=g, dtype=torch.float64)
    cap = torch.randn(len(CAP_LENS), L, D, generator=g, dtype=torch.float64)
    img, cap = img / img.norm(dim=-1, keepdim=True), cap / cap.norm(dim=-1, keepdim=True)
    for x, lens in ((img, IMG_LENS), (cap, CAP_LENS)):
        pad = ~_lengths_mask(lens, x.shape[1])
        x[pad] = (37.0 * torch.randn(int(pad.sum()), D, generator=g)).double() if garbage else 0.0
    return img, torch.tensor(IMG_LENS), cap, torch.tensor(CAP_LENS)


def _train_and_eval(sim: Similarity, fn: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """``fn()`` in train mode and in eval mode, with the same random seed, restoring the
    module's mode and BatchNorm running statistics."""
    state = {k: v.clone() for k, v in sim.state_dict().items()}
    was = sim.training
    try:
        sim.train()
        torch.manual_seed(1)
        train = fn()
        sim.load_state_dict(state)
        sim.eval()
        torch.manual_seed(1)
        return train, fn()
    finally:
        sim.load_state_dict(state)
        sim.train(was)


def check_garbage_padding(sim: Similarity) -> None:
    """Garbage in padded slots scores exactly like zeros there, in eval and train mode."""
    img, il, cap, cl = head_inputs(garbage=True)
    img0, _, cap0, _ = head_inputs(garbage=False)
    for mode, (got, ref) in zip(
        ("train", "eval"),
        zip(
            _train_and_eval(sim, lambda: sim(img, il, cap, cl).detach()),
            _train_and_eval(sim, lambda: sim(img0, il, cap0, cl).detach()),
            strict=True,
        ),
        strict=True,
    ):
        assert torch.isfinite(got).all(), f"{mode} mode: non-finite scores"
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10, msg=f"{mode} mode: padding")


def check_no_gradient_at_padding(sim: Similarity) -> None:
    """The gradient of the scores reaches no padded slot (train and eval mode)."""
    img, il, cap, cl = head_inputs()
    for mode in ("train", "eval"):
        x, y = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
        state = {k: v.clone() for k, v in sim.state_dict().items()}
        sim.train(mode == "train")
        torch.manual_seed(1)
        out = sim(x, il, y, cl)
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
        sim.load_state_dict(state)
        sim.eval()
        for name, t, lens in (("image", x, IMG_LENS), ("caption", y, CAP_LENS)):
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"{mode}: {name} grad"
            pad = ~_lengths_mask(lens, t.shape[1])
            assert float(t.grad[pad].abs().max()) == 0.0, (
                f"{mode} mode: gradient at a padded {name}"
            )
            valid = t.grad[~pad]
            assert float(valid.abs().max()) > 0.0, f"{mode} mode: no gradient at valid {name}s"


BUDGETS_MB = (1e-6, 2e-3, 256.0)


def check_score_matrix(sim: Similarity) -> None:
    """``score_matrix`` equals the direct call at three budgets (the smallest gives one-image,
    one-caption blocks)."""
    img, il, cap, cl = head_inputs()
    with torch.no_grad():
        ref = sim(img, il, cap, cl)
    assert sim.block_sizes(K, L, 8, BUDGETS_MB[0], len(IMG_LENS)) == (1, 1)
    for mb in BUDGETS_MB:
        got = sim.score_matrix(img, il, cap, cl, max_block_mb=mb)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-9, msg=f"budget {mb} MB")


def check_train_equals_eval(sim: Similarity) -> None:
    """A head without parameters or buffers scores the same in train and eval mode."""
    if any(True for _ in sim.parameters()) or any(True for _ in sim.buffers()):
        return
    img, il, cap, cl = head_inputs()
    train, evl = _train_and_eval(sim, lambda: sim(img, il, cap, cl).detach())
    torch.testing.assert_close(train, evl, rtol=0, atol=1e-12)


def check_float32(sim: Similarity, atol: float = 1e-4) -> None:
    """float32 scores (direct and block-wise) are close to float64."""
    img, il, cap, cl = head_inputs(seed=3)
    with torch.no_grad():
        ref = sim(img, il, cap, cl)
    scale = max(1.0, float(ref.abs().max()))
    single = copy.deepcopy(sim).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # docs/numerics.md: the float32 trap of this CPU build
    try:
        with torch.no_grad():
            direct = single(img.float(), il, cap.float(), cl)
        blocks = single.score_matrix(img.float(), il, cap.float(), cl)
    finally:
        torch.set_num_threads(threads)
    for name, got in (("direct", direct), ("score_matrix", blocks)):
        assert got.dtype == torch.float32, name
        err = float((got.double() - ref).abs().max())
        assert err <= atol * scale, f"{name}: float32 differs from float64 by {err:.2e}"


class PeakMemory(TorchDispatchMode):
    """The peak bytes of tensor storage allocated inside the mode and still alive.

    An op output whose storage is shared with one of the op's inputs (a view, an in-place or
    ``out=`` op) is no allocation; any other output storage is one, alive until the last
    tensor viewing it is garbage collected."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type != "cpu":
                continue
            key = t.untyped_storage().data_ptr()
            entry = self.live.get(key)
            if entry is None:
                if key in inputs:
                    continue  # a view of / a write into memory allocated before the mode
                entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def check_workspace(sim: Similarity) -> None:
    """The peak memory allocated while scoring one block stays within the head's declared
    ``bytes_per_pair`` times the block's pairs (plus slack for small per-fragment vectors)."""
    g = torch.Generator().manual_seed(5)
    n_img, n_cap, k, n = 8, 96, 12, 10
    img = torch.randn(n_img, k, D, generator=g)
    cap = torch.randn(n_cap, n, D, generator=g)
    img, cap = img / img.norm(dim=-1, keepdim=True), cap / cap.norm(dim=-1, keepdim=True)
    il, cl = torch.full((n_img,), k), torch.full((n_cap,), n)
    sim = sim.float()
    head = sim.align
    peaks: list[tuple[int, int]] = []
    real = head.score_block

    def measured(images, captions, pooling, ws):  # noqa: ANN001
        before = ws.nbytes  # workspace buffers of earlier blocks (reused, not allocated here)
        with PeakMemory() as mem:
            out = real(images, captions, pooling, ws)
        pairs = images.emb.shape[0] * captions.emb.shape[0]
        peaks.append((mem.peak + before, pairs))
        return out

    head.score_block = measured  # type: ignore[method-assign]
    try:
        sim.score_matrix(img, il, cap, cl, max_block_mb=1.0)
    finally:
        del head.score_block
        sim.double()
    declared = head.bytes_per_pair(k, n, 4)
    for used, pairs in peaks:
        allowed = 1.25 * declared * pairs + 16 * 1024
        assert used <= allowed, f"block of {pairs} pairs used {used} B > declared {allowed:.0f} B"


def check_alignment(sim: Similarity) -> None:
    """``alignment(img [K, d], cap [L, d])`` is ``[L, K]``, finite, and sums to 1 along the
    declared axis (``regions``: each row; ``words``: each column)."""
    img, il, cap, cl = head_inputs()
    head = sim.align
    for i, j in ((0, 0), (1, 1), (2, 3)):
        v, e = img[i, : IMG_LENS[i]], cap[j, : CAP_LENS[j]]
        with torch.no_grad():
            att = head.alignment(v, e)
        assert tuple(att.shape) == (CAP_LENS[j], IMG_LENS[i]), tuple(att.shape)
        assert torch.isfinite(att).all()
        axis = head.alignment_normalised
        if axis is not None:
            assert axis in ("regions", "words"), axis
            sums = att.sum(dim=1 if axis == "regions" else 0)
            torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-9)
            assert float(att.min()) >= 0.0


def check_bf16(sim: Similarity) -> None:
    """``score_matrix(precision="bf16")`` is close to float32 (its products in bfloat16: ~3
    significant digits), or, for a head without bf16 support, refused with its name."""
    img, il, cap, cl = head_inputs(seed=4)
    single = copy.deepcopy(sim).float()
    img, cap = img.float(), cap.float()
    if not single.align.supports_bf16:
        try:
            single.score_matrix(img, il, cap, cl, precision="bf16")
        except ValueError as err:
            assert type(single.align).__name__ in str(err) and "bf16" in str(err), str(err)
            return
        raise AssertionError("a head without supports_bf16 accepted bf16 scoring")
    ref = single.score_matrix(img, il, cap, cl)
    got = single.score_matrix(img, il, cap, cl, precision="bf16")
    assert got.dtype == torch.float32
    err = float((got - ref).abs().max())
    assert err <= 2e-2 * max(1.0, float(ref.abs().max())), f"bf16 differs by {err:.2e}"


HEAD_CHECKS: tuple[Callable[[Similarity], None], ...] = (
    check_garbage_padding,
    check_no_gradient_at_padding,
    check_score_matrix,
    check_train_equals_eval,
    check_float32,
    check_workspace,
    check_alignment,
    check_bf16,
)


def check_head(sim: Similarity) -> None:
    """Every head check, in order."""
    for check in HEAD_CHECKS:
        check(sim)


# --- poolings ------------------------------------------------------------------------------------


def build_pooling(name: str, conf_dir: Path = CONF_DIR) -> torch.nn.Module | None:
    """``pooling=<name>``'s module (None for ``none``), float64, eval mode."""
    from hydra.utils import instantiate

    with hydra_config(conf_dir) as compose:
        cfg = compose([f"pooling={name}", f"model.embed_size={D}"])
    torch.manual_seed(0)
    pool = instantiate(cfg.model.pooling)
    return None if pool is None else pool.double().eval()


def check_pooling(pool: torch.nn.Module) -> None:
    """Masked-set pooling ``[..., N, D] x [..., N] -> [..., D]``: garbage at invalid items does
    not matter nor gets gradient, float32 ~ float64, and an empty set pools to a finite value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, D, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, 7, generator=g) < 0.6
    mask[..., 0] = True
    mask[0, 0, :] = False  # an empty set
    garbage = torch.where(mask[..., None], x, 50.0 * torch.randn_like(x))
    zeros = torch.where(mask[..., None], x, torch.zeros_like(x))
    xg = garbage.clone().requires_grad_(True)
    out = pool(xg, mask)
    assert out.shape == (3, 4, D), tuple(out.shape)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out, pool(zeros, mask), rtol=0, atol=1e-10)
    out.sum().backward()
    assert xg.grad is not None and float(xg.grad[~mask].abs().max()) == 0.0
    single = copy.deepcopy(pool).float()
    with torch.no_grad():
        err = float((single(garbage.float(), mask).double() - out.detach()).abs().max())
    assert err <= 1e-4 * max(1.0, float(out.abs().max())), err


# --- encoders ------------------------------------------------------------------------------------

#: region feature size and vocabulary size of the encoder checks
IMG_DIM, VOCAB = 12, 40


def build_encoder(
    kind: str, name: str, conf_dir: Path = CONF_DIR, **fields: Any
) -> torch.nn.Module:
    """``model/<kind>=<name>`` (kind ``image_encoder`` or ``text_encoder``) with d = 16, small
    inputs, and ``fields`` (e.g. a BERT ``path``) set on its node; float64, eval mode."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    with hydra_config(conf_dir) as compose:
        cfg = compose([f"model/{kind}={name}", f"model.embed_size={D}"])
    node = cfg.model[kind]
    with open_dict(node):
        for key, value in {"img_dim": IMG_DIM, "vocab_size": VOCAB, "word_dim": 8}.items():
            if key in node:
                node[key] = value
        for key, value in fields.items():
            node[key] = value
    torch.manual_seed(0)
    return instantiate(node).double().eval()


def _emb(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def check_image_encoder(enc: torch.nn.Module) -> None:
    """``enc(x [B, K, img_dim], lengths) -> [B, K', d]``: garbage in padded regions changes no
    valid output (eval and train mode, same seed) and gets no gradient."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor(IMG_LENS)
    x = torch.rand(len(IMG_LENS), K, IMG_DIM, generator=g, dtype=torch.float64) * 2
    pad = ~_lengths_mask(IMG_LENS, K)
    garbage, zeros = x.clone(), x.clone()
    garbage[pad] = 50.0 * torch.randn(int(pad.sum()), IMG_DIM, generator=g).double()
    zeros[pad] = 0.0
    extra = enc.example_inputs(lens, K) if hasattr(enc, "example_inputs") else {}
    for mode in ("eval", "train"):
        enc.train(mode == "train")
        xg = garbage.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = _emb(enc(xg, lens, **extra))
        torch.manual_seed(1)
        ref = _emb(enc(zeros, lens, **extra))
        assert out.shape[0] == len(IMG_LENS) and out.shape[-1] == D, tuple(out.shape)
        assert torch.isfinite(out).all(), mode
        if out.shape[1] == K:  # fragment embeddings: compare the valid ones
            valid = ~pad
            torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-10, msg=mode)
            weights = torch.linspace(0.5, 1.5, int(valid.sum()), dtype=out.dtype)
            (out[valid] * weights[:, None]).sum().backward()
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=mode)
            out.sum().backward()
        assert xg.grad is not None and float(xg.grad[pad].abs().max()) == 0.0, mode
    enc.eval()


def check_text_encoder(enc: torch.nn.Module) -> None:
    """``enc(tokens [B, L], lengths) -> [B, L', d]``: garbage token ids past each length change
    no valid output (eval and train mode, same seed)."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor(CAP_LENS)
    n_special = 4
    high = int(getattr(enc, "vocab_size", VOCAB) or VOCAB)
    tokens = torch.randint(n_special, high, (len(CAP_LENS), L), generator=g)
    tokens[:, 0] = 1  # <start> / [CLS]-like first token
    pad = ~_lengths_mask(CAP_LENS, L)
    garbage, zeros = tokens.clone(), tokens.clone()
    garbage[pad] = torch.randint(n_special, high, (int(pad.sum()),), generator=g)
    zeros[pad] = 0
    for mode in ("eval", "train"):
        enc.train(mode == "train")
        torch.manual_seed(1)
        out = _emb(enc(garbage, lens))
        torch.manual_seed(1)
        ref = _emb(enc(zeros, lens))
        assert out.shape[0] == len(CAP_LENS) and out.shape[-1] == D, tuple(out.shape)
        assert torch.isfinite(out).all(), mode
        if out.shape[1] == L:
            valid = ~pad
            torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-10, msg=mode)
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=mode)
    enc.eval()
