"""VSRN (docs/vsrn.md): the `gcn` image encoder, the `gru_last` / `last` poolings, the
per-side pooling of the `global` head and the `caption` auxiliary loss, against the authors'
fixture (KunpengLi1994/VSRN, F30K model, eval mode) through the contract names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import load_fixture
from itm.models.auxiliary import CaptionLoss
from itm.models.encoders import GCNImageEncoder
from itm.models.encoders.gcn import batch_norm_valid
from itm.models.pooling import GRULastPool, LastPool
from wave2_weights import load_by_contract, vsrn_contract

ATOL = 1e-7  # the fixture's tolerance: the authors' norms have no eps, itm's add 1e-8


@pytest.fixture(scope="module")
def z():
    return load_fixture("vsrn_f30k")


def _overrides(z, recipe="vsrn_f30k"):
    return [
        f"experiment={recipe}",
        f"model.embed_size={int(z['embed_size'])}",
        f"model.image_encoder.img_dim={int(z['img_dim'])}",
        f"model.text_encoder.vocab_size={int(z['vocab_size'])}",
        f"model.text_encoder.word_dim={int(z['word_dim'])}",
        f"model.aux.dim_hidden={int(z['dim_hidden'])}",
        f"model.aux.dim_word={int(z['dim_word'])}",
    ]


@pytest.fixture
def vsrn_module(compose, z):
    """The whole VSRN model of the F30K recipe at the fixture's sizes, float64, the fixture's
    weights loaded by their contract names, eval mode."""
    from itm.models.module import ITMModule

    torch.manual_seed(0)
    cfg = compose(_overrides(z))
    module = ITMModule(OmegaConf.to_container(cfg.model, resolve=True)).double()
    load_by_contract(module, vsrn_contract(z))
    return module.eval()


def _t(z, key):
    return torch.from_numpy(np.array(z[key]))


def _fixture_batch(z):
    return {
        "images": _t(z, "images"),
        "img_lens": _t(z, "img_lens"),
        "tokens": _t(z, "tokens"),
        "cap_lens": _t(z, "cap_lens"),
    }


def _valid(lengths, size):
    return torch.arange(size)[None, :] < lengths[:, None]


# --- the fixture, end to end through the recipe's config ------------------------------------


def test_recipe_config_matches_the_fixture_switches(compose, z):
    cfg = compose(_overrides(z)).model
    assert cfg.image_encoder.pre_norm is bool(z["pre_norm"]) is False
    assert cfg.image_pooling.final_bn is bool(z["final_bn"]) is True
    assert cfg.text_encoder.bidirectional is False and cfg.text_encoder.norm is True
    assert cfg.aux.max_len == int(z["max_len"]) and cfg.aux.weight == 1.0
    assert cfg.aux.vocab_size == int(z["vocab_size"])  # follows the text encoder's vocabulary
    assert cfg.loss.margin == float(z["margin"]) and cfg.loss.max_violation is True
    coco = compose(_overrides(z, "vsrn_coco")).model
    assert coco.image_encoder.pre_norm is True and coco.image_pooling.final_bn is False


def test_fixture_through_the_contract(vsrn_module, z):
    m, b = vsrn_module, _fixture_batch(z)
    with torch.no_grad():
        v, img_lens = m.encode_images(b["images"], b["img_lens"])
        torch.testing.assert_close(v, _t(z, "gcn_emb"), rtol=0, atol=ATOL)
        words, cap_lens = m.encode_captions(b["tokens"], b["cap_lens"])
        valid = _valid(cap_lens, words.shape[1])
        torch.testing.assert_close(words[valid], _t(z, "cap_words")[valid], rtol=0, atol=ATOL)
        sims = m.similarity(v, img_lens, words, cap_lens)
        torch.testing.assert_close(sims, _t(z, "sims"), rtol=0, atol=ATOL)
        head = m.similarity.align
        img_vec, cap_vec = head.embed(v, _valid(img_lens, v.shape[1]), words, valid)
        torch.testing.assert_close(img_vec, _t(z, "img_emb"), rtol=0, atol=ATOL)
        torch.testing.assert_close(cap_vec, _t(z, "cap_emb"), rtol=0, atol=ATOL)
        loss = m.criterion(sims[:4, :4])
        assert abs(float(loss) - float(z["retrieval_loss"])) <= ATOL * max(1.0, float(loss))
        cap = m.aux(v[:4], img_lens[:4], b["tokens"][:4], b["cap_lens"][:4])
        ref = float(z["caption_loss"])
        assert abs(float(cap) - ref) <= ATOL * max(1.0, ref)


def test_contract_parameter_names(vsrn_module):
    names = set(vsrn_module.state_dict())
    assert {"image_encoder.fc.weight", "image_encoder.gcn.3.out.weight"} <= names
    assert {"image_encoder.gcn.0.bn.running_var", "text_encoder.rnn.weight_hh_l0"} <= names
    assert "similarity.align.image_pool.gru.weight_ih_l0" in names
    assert "similarity.align.image_pool.bn.running_mean" in names
    assert "aux.decoder.attention.linear2.weight" in names
    assert "aux.decoder.attention.linear2.bias" not in names
    assert not any(n.startswith("similarity.align.text_pool.") for n in names)  # `last`
    assert not any(n.startswith("similarity.pooling") for n in names)


def test_score_matrix_pools_each_image_once_and_equals_forward(vsrn_module, z):
    """Evaluation: the head pools every image (the GRU) once per scoring run, not once per
    caption block, and block-wise scoring of garbage-padded sets equals the direct scores."""
    m, b = vsrn_module, _fixture_batch(z)
    x, il = _garbage_batch(z)
    with torch.no_grad():
        v, il = m.encode_images(x, il)
        words, cl = m.encode_captions(b["tokens"], b["cap_lens"])
        direct = m.similarity(v, il, words, cl)
        calls = []
        hook = m.similarity.align.image_pool.register_forward_hook(lambda *a: calls.append(1))
        m.similarity.max_caption_block = 2  # three caption blocks
        try:
            blocks = m.similarity.score_matrix(v, il, words, cl, max_block_mb=1e-5)
        finally:
            hook.remove()
    torch.testing.assert_close(blocks, direct, rtol=0, atol=1e-12)
    assert len(calls) == 1
    for i, n in enumerate(il.tolist()):  # each image as if it were alone
        with torch.no_grad():
            alone, _ = m.encode_images(x[i : i + 1, :n], il[i : i + 1])
            row = m.similarity(alone, il[i : i + 1], words, cl)
        torch.testing.assert_close(direct[i], row[0], rtol=0, atol=1e-12)


def test_fixture_intermediates(z):
    """fc output, every GCN layer, the GRU's hidden state (before the final BatchNorm)."""
    named = vsrn_contract(z)
    d, img_dim = int(z["embed_size"]), int(z["img_dim"])
    enc = GCNImageEncoder(img_dim, d, pre_norm=False).double().eval()
    load_by_contract(enc, named, strip="image_encoder.")
    x, lens = _t(z, "images"), _t(z, "img_lens")
    mask = _valid(lens, x.shape[1])
    with torch.no_grad():
        h = enc.fc(x)
        torch.testing.assert_close(h, _t(z, "fc_out"), rtol=0, atol=1e-12)
        count = lens.double()[:, None, None]
        for i, layer in enumerate(enc.gcn):
            h = layer(h, mask, count)
            # the layers' outputs grow to ~1e6 (unnormalised F30K path): relative 1e-12
            torch.testing.assert_close(h, _t(z, "gcn_layers")[i], rtol=1e-12, atol=1e-9)
        pool = GRULastPool(d, final_bn=False).double().eval()
        gru = {k: v for k, v in named.items() if k.startswith("image_pool.gru.")}
        load_by_contract(pool, gru, strip="image_pool.")
        hidden = pool(_t(z, "gcn_emb"), mask)
        torch.testing.assert_close(hidden, _t(z, "img_hidden"), rtol=0, atol=1e-9)


def test_caption_labels_follow_the_authors_layout(z):
    """Inputs y_0..y_{T-1}, targets y_1..y_T with T = min(n, max_len - 1): the authors' labels
    and masks (``caption_labels`` / ``caption_masks``, ``[B, max_len + 1]``) shifted by one."""
    loss = CaptionLoss(vocab_size=int(z["vocab_size"]), embed_size=8, dim_hidden=4, dim_word=4)
    inputs, targets, mask = loss.labels(_t(z, "tokens"), _t(z, "cap_lens"))
    labels, masks = _t(z, "caption_labels"), _t(z, "caption_masks").bool()
    t = inputs.shape[1]
    assert t == int(_t(z, "cap_lens").max())
    torch.testing.assert_close(mask, masks[:, 1 : t + 1])
    torch.testing.assert_close(targets[mask], labels[:, 1 : t + 1][mask])
    torch.testing.assert_close(inputs[mask], labels[:, :t][mask])
    assert bool((targets[mask] == 0).any())  # the <pad> after <end> is a target


# --- padding holds garbage -------------------------------------------------------------------


def _garbage_batch(z, lengths=(6, 3, 1, 5), extra=2, seed=0):
    """The fixture's images with variable lengths, padded (to K + extra) with garbage."""
    g = torch.Generator().manual_seed(seed)
    x = _t(z, "images")
    b, k, dim = x.shape
    padded = 50 * torch.randn(b, k + extra, dim, generator=g, dtype=torch.float64)
    lens = torch.tensor(lengths)
    for i, n in enumerate(lengths):
        padded[i, :n] = x[i, :n]
    return padded, lens


@pytest.mark.parametrize("pre_norm", [False, True])
def test_gcn_ignores_garbage_padding(z, pre_norm):
    """Each image's V* equals the encoder run on the image's valid regions alone."""
    torch.manual_seed(0)
    enc = GCNImageEncoder(int(z["img_dim"]), int(z["embed_size"]), pre_norm=pre_norm).double()
    load_by_contract(enc, vsrn_contract(z), strip="image_encoder.")
    enc.eval()
    x, lens = _garbage_batch(z)
    with torch.no_grad():
        out = enc(x, lens)
        assert torch.isfinite(out).all()
        for i, n in enumerate(lens.tolist()):
            alone = enc(x[i : i + 1, :n], lens[i : i + 1])
            torch.testing.assert_close(out[i, :n], alone[0], rtol=0, atol=1e-12)
            # the region-axis norm: every channel has unit norm over the valid regions
            norms = out[i, :n].norm(dim=0)
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-7)


def test_gcn_gradients_stay_off_padding(z):
    enc = GCNImageEncoder(int(z["img_dim"]), int(z["embed_size"])).double().train()
    x, lens = _garbage_batch(z)
    x.requires_grad_(True)
    v = enc(x, lens)
    mask = _valid(lens, x.shape[1])
    (v[mask] ** 3).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[~mask].abs().max() == 0
    assert x.grad[mask].abs().max() > 0


def test_gcn_train_mode_batchnorm_statistics_over_valid_regions(z):
    """In training, more padded (garbage) slots change neither V* nor the running statistics:
    BatchNorm's batch statistics are those of the valid regions only."""

    def run(extra):
        torch.manual_seed(0)
        enc = GCNImageEncoder(int(z["img_dim"]), int(z["embed_size"])).double()
        for layer in enc.gcn:  # non-trivial affine so that the statistics reach the output
            torch.nn.init.uniform_(layer.bn.weight, 0.5, 1.5)
        enc.train()
        x, lens = _garbage_batch(z, extra=extra, seed=extra)
        v = enc(x, lens)
        mask = _valid(lens, x.shape[1])
        return v[mask], [layer.bn.running_mean.clone() for layer in enc.gcn]

    v1, stats1 = run(1)
    v2, stats2 = run(7)
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-12)
    for a, b in zip(stats1, stats2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_batch_norm_valid_uses_only_valid_rows():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3).double().train()
    ref = torch.nn.BatchNorm1d(3).double().train()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    out = batch_norm_valid(bn, x, mask)
    torch.testing.assert_close(out[mask], ref(x[mask]), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-15)
    assert out[~mask].abs().max() == 0


def test_region_norm_option_features(z):
    enc = GCNImageEncoder(int(z["img_dim"]), int(z["embed_size"]), norm_over="features")
    enc = enc.double().eval()
    x, lens = _garbage_batch(z)
    with torch.no_grad():
        out = enc(x, lens)
    mask = _valid(lens, x.shape[1])
    norms = out[mask].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="norm_over"):
        GCNImageEncoder(8, 8, norm_over="channels")


# --- poolings ----------------------------------------------------------------------------------


def test_gru_last_reads_the_valid_items_in_order():
    torch.manual_seed(0)
    pool = GRULastPool(4, final_bn=False).double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    out = pool(x, mask)
    for i in range(3):
        items = x[i][mask[i]][None]
        _, h = pool.gru(items)
        torch.testing.assert_close(out[i], h[0, 0], rtol=0, atol=1e-12)
    # garbage at the invalid positions changes nothing; an empty set pools to 0
    y = torch.where(mask[..., None], x, torch.full_like(x, 1e6))
    torch.testing.assert_close(pool(y, mask), out, rtol=0, atol=0)
    empty = pool(x[:1], torch.zeros(1, 5, dtype=torch.bool))
    assert empty.abs().max() == 0


def test_gru_last_final_bn_uses_batch_statistics_in_training():
    torch.manual_seed(0)
    pool = GRULastPool(4, final_bn=True).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    mask = torch.ones(6, 3, dtype=torch.bool)
    out = pool.train()(x, mask)
    torch.testing.assert_close(out.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert pool.bn.num_batches_tracked == 1
    assert set(dict(pool.named_parameters())) == {
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "gru.bias_ih_l0",
        "gru.bias_hh_l0",
        "bn.weight",
        "bn.bias",
    }
    assert "bn.weight" not in dict(GRULastPool(4).named_parameters())


def test_last_pool_takes_the_last_valid_item():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(LastPool()(x, mask), torch.stack([x[0, 2], x[1, 2]]))
    assert LastPool()(x, torch.zeros(2, 4, dtype=torch.bool)).abs().max() == 0
    x.requires_grad_(True)
    LastPool()(x, mask).sum().backward()
    assert x.grad[0, 2].eq(1).all() and x.grad.sum() == 6


# --- the caption loss --------------------------------------------------------------------------


def _caption_loss(z, **kw):
    torch.manual_seed(0)
    loss = CaptionLoss(
        vocab_size=int(z["vocab_size"]),
        embed_size=int(z["embed_size"]),
        dim_hidden=int(z["dim_hidden"]),
        dim_word=int(z["dim_word"]),
        **kw,
    ).double()
    load_by_contract(loss, vsrn_contract(z), strip="aux.")
    return loss.eval()


def test_caption_loss_is_a_sum_over_words_divided_by_the_batch(z):
    loss = _caption_loss(z)
    v, tokens, lens = _t(z, "gcn_emb"), _t(z, "tokens"), _t(z, "cap_lens")
    il = _t(z, "img_lens")
    with torch.no_grad():
        pair = loss(v[:2], il[:2], tokens[:2], lens[:2])
        each = [
            loss(v[i : i + 1], il[i : i + 1], tokens[i : i + 1], lens[i : i + 1]) for i in (0, 1)
        ]
    # mean over the batch of per-caption sums (not a mean over tokens: lengths 10 and 9 differ)
    torch.testing.assert_close(pair, (each[0] + each[1]) / 2, rtol=0, atol=1e-10)


def test_caption_loss_ignores_garbage_padding(z):
    loss = _caption_loss(z)
    v, tokens, lens = _t(z, "gcn_emb")[:4], _t(z, "tokens")[:4], _t(z, "cap_lens")[:4]
    il = torch.tensor([6, 2, 4, 1])
    g = torch.Generator().manual_seed(3)
    v2 = v.clone()
    v2[~_valid(il, 6)] = 40 * torch.randn(
        int((~_valid(il, 6)).sum()), v.shape[-1], generator=g, dtype=v.dtype
    )
    tok2 = torch.cat([_t(z, "tokens_zero_pad")[:4], torch.full((4, 5), 7)], dim=1)
    with torch.no_grad():
        a = loss(v, il, tokens, lens)
        b = loss(v2, il, tok2, lens)
        alone = (
            sum(
                loss(v[i : i + 1, : il[i]], il[i : i + 1], tokens[i : i + 1], lens[i : i + 1])
                for i in range(4)
            )
            / 4
        )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a, alone, rtol=0, atol=1e-10)


def test_caption_loss_truncates_at_max_len(z):
    """A caption of n >= max_len tokens keeps its first max_len with <end> last; one shorter
    than max_len also predicts the <pad> after its <end>."""
    loss = _caption_loss(z, max_len=5)
    v, il = _t(z, "gcn_emb")[:1], _t(z, "img_lens")[:1]
    long = torch.tensor([[1, 4, 5, 8, 4, 9, 10, 2]])  # 8 tokens
    cut = torch.tensor([[1, 4, 5, 8, 2]])  # what the labels become: first 5, <end> last
    with torch.no_grad():
        a = loss(v, il, long, torch.tensor([8]))
        b = loss(v, il, cut, torch.tensor([5]))
        c = loss(v, il, torch.tensor([[1, 4, 5, 8, 4]]), torch.tensor([5]))  # <end> written
        short = loss(v, il, torch.tensor([[1, 4, 5, 2]]), torch.tensor([4]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    inputs, targets, mask = loss.labels(torch.tensor([[1, 4, 5, 2]]), torch.tensor([4]))
    assert targets[mask].tolist() == [4, 5, 2, 0] and inputs[mask].tolist() == [1, 4, 5, 2]
    assert float(short) != float(b)


def test_caption_loss_train_mode_dropout(z):
    loss = _caption_loss(z)
    v, il, tokens, lens = (
        _t(z, "gcn_emb")[:4],
        _t(z, "img_lens")[:4],
        _t(z, "tokens")[:4],
        _t(z, "cap_lens")[:4],
    )
    with torch.no_grad():
        ref = loss(v, il, tokens, lens)
        torch.manual_seed(1)
        train = loss.train()(v, il, tokens, lens)
        loss.encoder.input_dropout.p = loss.decoder.input_dropout.p = 0.0
        no_drop = loss(v, il, tokens, lens)
    assert abs(float(train) - float(ref)) > 1e-6
    torch.testing.assert_close(no_drop, ref, rtol=0, atol=1e-12)


def test_caption_loss_gradient_reaches_valid_regions_only(z):
    loss = _caption_loss(z).train()
    v = _t(z, "gcn_emb")[:2].clone().requires_grad_(True)
    il = torch.tensor([6, 3])
    loss(v, il, _t(z, "tokens")[:2], _t(z, "cap_lens")[:2]).backward()
    mask = _valid(il, 6)
    assert v.grad[~mask].abs().max() == 0 and v.grad[mask].abs().max() > 0


def test_caption_loss_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionLoss(vocab_size=None)
    loss = CaptionLoss(vocab_size=5, embed_size=4, dim_hidden=4, dim_word=4)
    with pytest.raises(ValueError, match="token ids"):
        loss(torch.randn(1, 2, 4), torch.tensor([2]), torch.tensor([[1, 9, 2]]), torch.tensor([3]))


# --- configs -----------------------------------------------------------------------------------


def test_groups_instantiate_at_small_sizes(compose):
    cfg = compose(
        [
            "model/image_encoder=gcn",
            "model/align=global",
            "image_pooling=gru_last",
            "text_pooling=last",
            "model/aux=caption",
            "model.embed_size=16",
            "model.text_encoder.vocab_size=30",
        ]
    )
    assert isinstance(instantiate(cfg.model.image_encoder), GCNImageEncoder)
    assert isinstance(instantiate(cfg.model.image_pooling), GRULastPool)
    assert isinstance(instantiate(cfg.model.text_pooling), LastPool)
    aux = instantiate(cfg.model.aux)
    assert isinstance(aux, CaptionLoss) and aux.vocab_size == 30 and aux.weight_at(7) == 1.0
    for name in ("gru_last", "last"):
        pool = instantiate(compose([f"pooling={name}", "model.embed_size=16"]).model.pooling)
        assert isinstance(pool, GRULastPool if name == "gru_last" else LastPool)
    assert compose([]).model.aux is None and compose([]).model.image_pooling is None


def test_vsrn_recipe_trains_and_selects_by_r1r5(compose, tmp_path):
    """The VSRN recipe runs end to end at small sizes (caption loss included, logged), and the
    checkpoint can be chosen by VSRN's own figure, dev R@1 + R@5 of both directions."""
    import csv

    from omegaconf import open_dict

    from itm.train import train

    cfg = compose(
        [
            "experiment=vsrn_f30k",
            "debug=fast",
            "model.embed_size=32",
            "model.aux.dim_hidden=16",
            "model.aux.dim_word=8",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.monitor=dev/r1r5_sum",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg)
    assert "dev/best_r1r5_sum" in metrics and "dev/best_rsum" not in metrics
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    dev = next(r for r in rows if r.get("dev/r1r5_sum"))
    r1r5 = sum(float(dev[f"dev/{d}_r{k}"]) for d in ("i2t", "t2i") for k in (1, 5))
    assert float(dev["dev/r1r5_sum"]) == pytest.approx(r1r5)
    assert metrics["dev/best_r1r5_sum"] == pytest.approx(float(dev["dev/r1r5_sum"]))
    assert any(r.get("train/aux_loss") for r in rows)
