"""Encoders (fc, mlp, bigru) and size augmentation (region drop, word mask/replace/delete)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from itm.models.encoders import (
    BiGRUTextEncoder,
    FCImageEncoder,
    MLPImageEncoder,
    augment_words,
    drop_regions,
)

IMG_DIM, D = 24, 16


def _images(lengths, k=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), k, IMG_DIM, generator=g, dtype=dtype)
    return x, torch.tensor(lengths, dtype=torch.int64)


def _with_garbage(x, lengths, seed=1, scale=100.0):
    """A copy of ``x`` whose slots past each length hold large random values (random ids
    below ``scale`` for integer tensors)."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
    pad = pad.reshape(*pad.shape, *([1] * (x.dim() - 2))).expand_as(x)
    if x.is_floating_point():
        noise = scale * torch.randn(x.shape, generator=g, dtype=x.dtype)
    else:
        noise = torch.randint(0, int(scale), x.shape, generator=g)
    return torch.where(pad, noise, x)


def _tokens(lengths, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    t = torch.randint(4, vocab, (b, n), generator=g)
    lens = torch.tensor(lengths, dtype=torch.int64)
    t[:, 0] = 1
    t[torch.arange(b), lens - 1] = 2
    return t.masked_fill(torch.arange(n)[None, :] >= lens[:, None], 0), lens


def _valid(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]


# --- fc --------------------------------------------------------------------------------------


def test_fc_init_xavier_and_zero_bias():
    enc = FCImageEncoder(img_dim=300, embed_size=200)
    bound = math.sqrt(6.0 / (300 + 200))
    w = enc.fc.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound  # really uniform over the whole range
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(enc.fc.bias) == 0


def test_fc_l2norm_and_padding_garbage():
    enc = FCImageEncoder(IMG_DIM, D)
    x, lens = _images([7, 3, 1])
    out = enc(x, lens)
    assert out.shape == (3, 7, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 7))
    manual = enc.fc(x)
    torch.testing.assert_close(out, manual / (manual.norm(dim=-1, keepdim=True) + 1e-8))
    out_g = enc(_with_garbage(x, lens), lens)
    valid = _valid(lens, 7)
    torch.testing.assert_close(out_g[valid], out[valid], rtol=0, atol=0)
    raw = FCImageEncoder(IMG_DIM, D, norm=False)
    raw.load_state_dict(enc.state_dict())
    torch.testing.assert_close(raw(x, lens), manual)


# --- mlp -------------------------------------------------------------------------------------


def test_mlp_structure():
    enc = MLPImageEncoder(IMG_DIM, D)
    layers = list(enc.mlp)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (IMG_DIM, D // 2)
    assert layers[1].num_features == D // 2
    assert (layers[3].in_features, layers[3].out_features) == (D // 2, D)
    bound = math.sqrt(6.0 / (IMG_DIM + D))
    assert enc.fc.weight.abs().max() <= bound and torch.count_nonzero(enc.fc.bias) == 0


@pytest.mark.parametrize("norm", [True, False])
def test_mlp_is_fc_plus_mlp_with_bn_over_valid_rows(norm):
    torch.manual_seed(0)
    enc = MLPImageEncoder(IMG_DIM, D, norm=norm).train()
    x, lens = _images([7, 3, 5, 1])
    valid = _valid(lens, 7)
    out = enc(x, lens)
    # manual: BatchNorm statistics of the valid rows alone (a fresh copy: running stats move)
    ref = MLPImageEncoder(IMG_DIM, D, norm=norm)
    ref.load_state_dict(enc.state_dict())
    ref.mlp[1].reset_running_stats()
    ref.train()
    rows = x[valid]
    manual = ref.fc(rows) + ref.mlp(rows)
    if norm:
        manual = manual / (manual.norm(dim=-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(out[valid], manual)
    assert torch.isfinite(out).all()


def test_mlp_padding_garbage_train_and_eval():
    torch.manual_seed(0)
    enc = MLPImageEncoder(IMG_DIM, D)
    x, lens = _images([7, 2, 4])
    valid = _valid(lens, 7)
    garbage = _with_garbage(x, lens)
    for mode in (True, False):
        enc.train(mode)
        state = {k: v.clone() for k, v in enc.state_dict().items()}
        a = enc(x, lens)
        enc.load_state_dict(state)
        b = enc(garbage, lens)
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-6, atol=1e-6)
        assert torch.isfinite(b).all()
    # the running statistics only ever saw valid rows: a zero-padded batch and a garbage one
    # leave the same running mean
    e1, e2 = MLPImageEncoder(IMG_DIM, D), MLPImageEncoder(IMG_DIM, D)
    e2.load_state_dict(e1.state_dict())
    e1.train()(x, lens)
    e2.train()(garbage, lens)
    torch.testing.assert_close(e1.mlp[1].running_mean, e2.mlp[1].running_mean)


# --- bigru -----------------------------------------------------------------------------------


def _manual_bigru(enc: BiGRUTextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """One caption [n] through two unidirectional nn.GRUs holding the encoder's weights."""
    x = enc.embed(tokens)[None]
    fwd = nn.GRU(x.shape[-1], enc.embed_size, batch_first=True)
    bwd = nn.GRU(x.shape[-1], enc.embed_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(fwd, f"{name}_l0").copy_(getattr(enc.rnn, f"{name}_l0"))
            getattr(bwd, f"{name}_l0").copy_(getattr(enc.rnn, f"{name}_l0_reverse"))
    h_f, _ = fwd(x)
    h_b, _ = bwd(x.flip(1))
    h = (h_f + h_b.flip(1)) / 2
    return (h / (h.norm(dim=-1, keepdim=True) + 1e-8))[0]


def test_bigru_packed_equals_alone_and_manual_directions():
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=50, word_dim=12, embed_size=D).eval()
    tokens, lens = _tokens([6, 3, 1, 5])
    out = enc(tokens, lens)
    assert out.shape == (4, 6, D)
    garbage = _with_garbage(tokens, lens, scale=50)  # in-vocabulary garbage past each length
    out_g = enc(garbage, lens)
    for i, n in enumerate(lens.tolist()):
        alone = enc(tokens[i : i + 1, :n], lens[i : i + 1])[0]
        torch.testing.assert_close(out[i, :n], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_g[i, :n], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            out[i, :n], _manual_bigru(enc, tokens[i, :n]), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(out[i, :n].norm(dim=-1), torch.ones(n))
    # out-of-vocabulary garbage past a length is ignored too; inside a caption it is an error
    wild = tokens.masked_fill(~_valid(lens, 6), 10_000)
    torch.testing.assert_close(enc(wild, lens), out)
    bad = tokens.clone()
    bad[0, 1] = 50
    with pytest.raises(ValueError, match="token ids"):
        enc(bad, lens)


# --- augmentation: functions -----------------------------------------------------------------


def test_drop_regions_p0_noop_and_validation():
    x, lens = _images([7, 3])
    out, new = drop_regions(x, lens, 0.0)
    assert out is x and new is lens
    with pytest.raises(ValueError):
        drop_regions(x, lens, 1.5)


def test_drop_regions_compacts_in_order():
    b, k = 64, 9
    x = torch.arange(b * k, dtype=torch.float64).reshape(b, k, 1).expand(b, k, 3).clone()
    lens = torch.randint(1, k + 1, (b,), generator=torch.Generator().manual_seed(0))
    x = _with_garbage(x, lens)
    g = torch.Generator().manual_seed(1)
    out, new = drop_regions(x, lens, 0.5, generator=g)
    assert new.dtype == lens.dtype and new.shape == lens.shape
    assert out.shape == (b, int(new.max()), 3)
    assert (new >= 1).all() and (new <= lens).all() and (new < lens).any()
    for i in range(b):
        kept = out[i, : new[i], 0]
        # kept regions are original VALID regions of image i, strictly increasing (order kept)
        idx = kept - i * k
        assert (idx >= 0).all() and (idx < lens[i]).all()
        assert (idx[1:] > idx[:-1]).all()
        assert (out[i, new[i] :] == 0).all()
        # each kept row is intact (all features carried along)
        assert (out[i, : new[i]] == kept[:, None]).all()


def test_drop_regions_keeps_one_and_is_reproducible():
    x, lens = _images([7, 1, 4, 2], seed=3)
    out, new = drop_regions(x, lens, 1.0)  # everything drawn: one region each survives
    assert new.tolist() == [1, 1, 1, 1] and out.shape == (4, 1, IMG_DIM)
    torch.testing.assert_close(out[1, 0], x[1, 0])
    a = drop_regions(x, lens, 0.4, generator=torch.Generator().manual_seed(5))
    b = drop_regions(x, lens, 0.4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert torch.equal(a[1], b[1])


def test_drop_regions_rate():
    x = torch.zeros(400, 36, 2)
    lens = torch.full((400,), 36)
    _, new = drop_regions(x, lens, 0.2, generator=torch.Generator().manual_seed(0))
    assert abs(1 - new.sum().item() / lens.sum().item() - 0.2) < 0.01


def test_augment_words_p0_noop_and_validation():
    t, lens = _tokens([5, 3])
    out, new = augment_words(t, lens, 0.0, mask_id=3, vocab_size=50, n_special=4)
    assert out is t and new is lens
    with pytest.raises(ValueError):
        augment_words(t, lens, 0.2, 3, 50, 4, split=(0.5, 0.5, 0.5))


def test_augment_words_ends_kept_deletion_compacts():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 12, (200,), generator=g)
    lens[:3] = torch.tensor([1, 2, 3])
    n = int(lens.max())
    # words are unique ids >= 100 so that we can track them; mask 3, random ids in [4, 50)
    words = (100 + torch.arange(n)).expand(200, n).clone()
    t = torch.where(_valid(lens, n), words, 0)
    t[:, 0] = 1
    t[torch.arange(200), lens - 1] = 2
    t = _with_garbage(t, lens, scale=1000)
    out, new = augment_words(t, lens, 0.6, 3, 50, 4, generator=torch.Generator().manual_seed(1))
    assert out.shape == (200, int(new.max())) and out.dtype == torch.int64
    assert (new <= lens).all() and (new < lens).any()
    assert (new >= torch.clamp(lens, max=2)).all()
    for i in range(200):
        row, m = out[i, : new[i]], int(new[i])
        assert row[0] == t[i, 0] and row[-1] == t[i, lens[i] - 1]  # [start] ... [end] kept
        assert (out[i, m:] == 0).all()  # padding is the pad id
        inner = row[1:-1]
        original = inner[inner >= 100]
        assert (original[1:] > original[:-1]).all()  # survivors in their original order
        assert ((inner >= 100) | (inner == 3) | ((inner >= 4) & (inner < 50))).all()
    assert new[0] == 1 and new[1] == 2 and out[1, :2].tolist() == [1, 2]


def test_augment_words_split_statistics_and_reproducible():
    b, n, p = 2000, 22, 0.2
    lens = torch.full((b,), n)
    t = torch.full((b, n), 100)
    t[:, 0], t[:, -1] = 1, 2
    out, new = augment_words(t, lens, p, 3, 50, 4, generator=torch.Generator().manual_seed(0))
    words = b * (n - 2)
    chosen = p * words
    deleted = (lens - new).sum().item()
    masked = (out == 3).sum().item()
    randomised = ((out >= 4) & (out < 50)).sum().item()
    assert abs(deleted / chosen - 0.4) < 0.03
    assert abs(masked / chosen - 0.5) < 0.03
    assert abs(randomised / chosen - 0.1) < 0.02
    assert abs((deleted + masked + randomised) / words - p) < 0.01
    again = augment_words(t, lens, p, 3, 50, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out) and torch.equal(again[1], new)
    # every slot is a survivor, the mask id, a random NON-special id, or padding past the length
    inner = out[_valid(new, out.shape[1])]
    assert ((inner == 100) | (inner == 3) | ((inner >= 4) & (inner < 50)) | (inner <= 2)).all()
    assert (out[~_valid(new, out.shape[1])] == 0).all()


# --- augmentation inside the encoders --------------------------------------------------------


@pytest.mark.parametrize("cls", [FCImageEncoder, MLPImageEncoder])
def test_image_encoders_region_drop(cls):
    torch.manual_seed(0)
    enc = cls(IMG_DIM, D, region_drop=0.5)
    x, lens = _images([7, 5, 3, 6])
    enc.eval()
    out = enc(x, lens)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 7, D)  # eval: no-op
    enc.train()
    out, new = enc(x, lens)
    assert out.shape == (4, int(new.max()), D) and (new <= lens).all() and (new >= 1).all()
    valid = _valid(new, out.shape[1])
    torch.testing.assert_close(out[valid].norm(dim=-1), torch.ones(int(new.sum())))
    plain = cls(IMG_DIM, D).train()
    assert isinstance(plain(x, lens), torch.Tensor)  # p = 0: no tuple even in training


def test_bigru_word_aug_train_only():
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=50, word_dim=12, embed_size=D, word_aug=0.5)
    assert enc.mask_id == 3 and enc.n_special == 4
    tokens, lens = _tokens([9, 4, 2, 7])
    enc.eval()
    out = enc(tokens, lens)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 9, D)
    enc.train()
    out, new = enc(tokens, lens)
    assert out.shape == (4, int(new.max()), D)
    assert (new <= lens).all() and new[2] == 2
    valid = _valid(new, out.shape[1])
    torch.testing.assert_close(out[valid].norm(dim=-1), torch.ones(int(new.sum())))
    assert (out[~valid] == 0).all()


@pytest.mark.parametrize("which", ["fc", "mlp", "bigru"])
def test_gradients_finite_with_augmentation(which):
    torch.manual_seed(0)
    if which == "bigru":
        enc = BiGRUTextEncoder(vocab_size=50, word_dim=12, embed_size=D, word_aug=0.3)
        x, lens = _tokens([9, 4, 2, 7])
    else:
        cls = FCImageEncoder if which == "fc" else MLPImageEncoder
        enc = cls(IMG_DIM, D, region_drop=0.3)
        x, lens = _images([7, 5, 1, 6])
        x.requires_grad_(True)
    out, new = enc.train()(x, lens)
    loss = out[_valid(new, out.shape[1])].sum()
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if x.is_floating_point():
        assert torch.isfinite(x.grad).all()


def test_encoders_pickle():
    enc = MLPImageEncoder(IMG_DIM, D, region_drop=0.2)
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.region_drop == 0.2
    x, lens = _images([7, 3])
    torch.testing.assert_close(clone.eval()(x, lens), enc.eval()(x, lens))


# --- configs ---------------------------------------------------------------------------------


def test_encoder_configs(compose):
    from hydra.utils import instantiate

    cfg = compose(
        ["model/image_encoder=mlp", "model.embed_size=16", "model.image_encoder.img_dim=24"]
    )
    enc = instantiate(cfg.model.image_encoder)
    assert isinstance(enc, MLPImageEncoder) and enc.region_drop == 0.0 and enc.norm
    cfg = compose(["model.embed_size=16", "model.image_encoder.img_dim=24"])
    assert cfg.model.image_encoder.region_drop == 0.0
    assert cfg.model.text_encoder.get("word_aug", 0.0) == 0.0
    cfg = compose(["model/text_encoder=bert"])
    assert cfg.model.text_encoder._target_ == "itm.models.encoders.BertTextEncoder"
    assert cfg.model.text_encoder.lr_mult == 0.1
