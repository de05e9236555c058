"""SAEM (docs/saem.md): the `transformer` image encoder, the `bert_cnn` text encoder, the
`angular` auxiliary loss and the weight-norm penalty, against the authors' fixtures
(yiling2018/saem, eval mode) through the contract names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import load_fixture
from itm.models import weight_norm_penalty
from itm.models.auxiliary import AngularLoss
from itm.models.encoders import BertCNNTextEncoder, TransformerImageEncoder
from wave2_weights import load_by_contract, saem_image_contract, saem_text_contract

ATOL = 1e-7  # the fixtures' tolerance (F.normalize has no eps; itm's l2n adds 1e-8)


@pytest.fixture(scope="module")
def zi():
    return load_fixture("saem_img")


@pytest.fixture(scope="module")
def zt():
    return load_fixture("saem_txt")


def _t(z, key):
    return torch.from_numpy(np.array(z[key]))


def _valid(lengths, size):
    return torch.arange(size)[None, :] < lengths[:, None]


@pytest.fixture(scope="module")
def fixture_bert(zt, tmp_path_factory) -> Path:
    """A local BERT directory holding the fixture's tiny BERT (Hugging Face layout) and a
    vocab.txt with the fixture's special ids ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("saem_bert")
    config = BertConfig(**json.loads(str(zt["bert_config_json"])))
    bert = BertModel(config, add_pooling_layer=False)
    named = saem_text_contract(zt)
    load_by_contract(bert, named, strip="text_encoder.bert.")
    bert.save_pretrained(directory)
    words = [f"w{i}" for i in range(5, config.vocab_size)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


def _image_overrides(zi):
    return [
        f"model.embed_size={int(zi['embed_size'])}",
        f"model.image_encoder.img_dim={int(zi['img_dim'])}",
        f"model.image_encoder.num_heads={int(zi['num_heads'])}",
        f"model.image_encoder.ffn_dim={int(zi['ffn_dim'])}",
    ]


@pytest.fixture
def saem_module(compose, zi, zt, fixture_bert):
    """The SAEM recipe's model at the fixtures' sizes, float64, weights by contract names."""
    from itm.models.module import ITMModule

    assert int(zi["embed_size"]) == int(zt["embed_size"])
    cfg = compose(
        [
            "experiment=saem_f30k",
            *_image_overrides(zi),
            f"model.text_encoder.path={fixture_bert}",
            f"model.text_encoder.channels={int(zt['channels'])}",
        ]
    )
    torch.manual_seed(0)
    module = ITMModule(OmegaConf.to_container(cfg.model, resolve=True)).double()
    load_by_contract(module, {**saem_image_contract(zi), **saem_text_contract(zt)})
    return module.eval()


# --- the fixtures through the recipe's config ------------------------------------------------


def test_recipe_config(compose, fixture_bert):
    for recipe in ("saem_f30k", "saem_coco"):
        cfg = compose([f"experiment={recipe}", f"model.text_encoder.path={fixture_bert}"])
        m = cfg.model
        assert m.embed_size == 256 and m.image_encoder._target_.endswith("TransformerImageEncoder")
        assert m.text_encoder.freeze is True and m.text_encoder.max_words == 32
        assert m.aux.weight == 0.5 and m.weight_norm_penalty == 0.01
        assert m.loss.max_violation is True and m.optimizer.lr == 1.0e-4
        assert m.scheduler.step_size == 10 and cfg.data.batch_size == 64
        assert cfg.trainer.gradient_clip_val is None  # the authors' code never clips


def test_fixtures_through_the_contract(saem_module, zi, zt):
    m = saem_module
    images, img_lens = _t(zi, "images"), _t(zi, "img_lens")
    tokens, cap_lens = _t(zt, "tokens"), _t(zt, "cap_lens")  # garbage past each length
    with torch.no_grad():
        states, img_lens2 = m.encode_images(images, img_lens)
        torch.testing.assert_close(states, _t(zi, "hidden"), rtol=0, atol=ATOL)
        cap, cap_lens2 = m.encode_captions(tokens, cap_lens)
        assert cap.shape == (4, 1, int(zt["embed_size"])) and cap_lens2.tolist() == [1] * 4
        torch.testing.assert_close(cap[:, 0], _t(zt, "cap_emb"), rtol=0, atol=ATOL)
        head = m.similarity.align
        img_vec, cap_vec = head.embed(
            states, _valid(img_lens2, states.shape[1]), cap, _valid(cap_lens2, 1)
        )
        torch.testing.assert_close(img_vec, _t(zi, "img_emb"), rtol=0, atol=ATOL)
        torch.testing.assert_close(cap_vec, _t(zt, "cap_emb"), rtol=0, atol=ATOL)
        sims = m.similarity(states, img_lens2, cap, cap_lens2)
        ref = _t(zi, "img_emb") @ _t(zt, "cap_emb").T
        torch.testing.assert_close(sims, ref, rtol=0, atol=ATOL)
        penalty = float(weight_norm_penalty(m.image_encoder))
        assert abs(penalty - float(zi["weight_norm_sum"])) <= ATOL * max(1.0, penalty)


def test_bert_cnn_intermediates(zt, fixture_bert):
    enc = BertCNNTextEncoder(str(fixture_bert), int(zt["embed_size"]), channels=int(zt["channels"]))
    enc = enc.double()
    load_by_contract(enc, saem_text_contract(zt), strip="text_encoder.")
    enc.eval()
    tokens, lens = _t(zt, "tokens"), _t(zt, "cap_lens")
    with torch.no_grad():
        ids, mask = enc.layout(tokens, lens)
        assert ids.tolist() == _t(zt, "tokens_max_words").tolist()
        assert mask.long().tolist() == _t(zt, "attention_mask").tolist()
        states = enc.bert_states(tokens, lens)
        torch.testing.assert_close(states, _t(zt, "bert_last"), rtol=0, atol=1e-10)
        feats = enc.conv_features(states)
        torch.testing.assert_close(feats, _t(zt, "conv_max"), rtol=0, atol=1e-10)
        # zero padding and a wider padded batch give the same result (always max_words slots)
        wide = torch.cat([_t(zt, "tokens_zero_pad"), torch.full((4, 9), 17)], dim=1)
        torch.testing.assert_close(enc(wide, lens)[0], enc(tokens, lens)[0], rtol=0, atol=0)


# --- bert_cnn behaviour ------------------------------------------------------------------------


def test_bert_cnn_cuts_long_captions_with_sep(zt, fixture_bert):
    enc = BertCNNTextEncoder(str(fixture_bert), 8, max_words=6, channels=4).eval()
    tokens = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 3], [2, 10, 3, 0, 0, 0, 0, 0, 0]])
    ids, mask = enc.layout(tokens, torch.tensor([9, 3]))
    assert ids.tolist() == [[2, 10, 11, 12, 13, 3], [2, 10, 3, 0, 0, 0]]
    assert mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    out, lens = enc(tokens, torch.tensor([9, 3]))
    assert out.shape == (2, 1, 8) and lens.tolist() == [1, 1]
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 1), rtol=0, atol=1e-6)


def test_bert_cnn_frozen_bert_stays_in_train_mode(fixture_bert):
    enc = BertCNNTextEncoder(str(fixture_bert), 8, channels=4)
    assert enc.bert.training  # not left in from_pretrained's eval mode (Lightning keeps it)
    assert not any(p.requires_grad for p in enc.bert.parameters())
    assert all(p.requires_grad for p in enc.convs.parameters())
    enc.train()
    assert enc.bert.training  # dropout inside BERT, as the authors' txt_enc.train()
    tokens, lens = torch.tensor([[2, 10, 11, 3]]), torch.tensor([4])
    torch.manual_seed(0)
    a = enc.bert_states(tokens, lens)
    b = enc.bert_states(tokens, lens)
    assert not torch.equal(a, b) and not a.requires_grad
    out, _ = enc(tokens, lens)
    out.sum().backward()
    assert (
        enc.fc.weight.grad is not None and enc.bert.embeddings.word_embeddings.weight.grad is None
    )
    unfrozen = BertCNNTextEncoder(str(fixture_bert), 8, channels=4, freeze=False)
    assert all(p.requires_grad for p in unfrozen.bert.parameters())


def test_bert_cnn_errors(fixture_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertCNNTextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="max_words"):
        BertCNNTextEncoder(str(fixture_bert), max_words=1000)
    with pytest.raises(ValueError, match="kernel_sizes"):
        BertCNNTextEncoder(str(fixture_bert), max_words=4, kernel_sizes=[5])


# --- transformer behaviour ---------------------------------------------------------------------


def _image_encoder(zi):
    enc = TransformerImageEncoder(
        int(zi["img_dim"]), int(zi["embed_size"]), int(zi["num_heads"]), int(zi["ffn_dim"])
    ).double()
    load_by_contract(enc, saem_image_contract(zi), strip="image_encoder.")
    return enc.eval()


def test_transformer_ignores_garbage_padding(zi):
    enc = _image_encoder(zi)
    x = _t(zi, "images")
    lens = torch.tensor([6, 2, 1, 4])
    g = torch.Generator().manual_seed(0)
    padded = torch.cat([x, torch.zeros(4, 3, x.shape[-1], dtype=x.dtype)], dim=1)
    garbage = ~_valid(lens, padded.shape[1])
    padded[garbage] = 1e3 * torch.randn(int(garbage.sum()), x.shape[-1], generator=g).double()
    with torch.no_grad():
        out = enc(padded, lens)
        assert torch.isfinite(out).all()
        for i, n in enumerate(lens.tolist()):
            alone = enc(x[i : i + 1, :n], lens[i : i + 1])
            torch.testing.assert_close(out[i, :n], alone[0], rtol=0, atol=1e-12)
    padded.requires_grad_(True)
    enc.train()(padded, lens)[~garbage].pow(2).sum().backward()
    assert padded.grad[garbage].abs().max() == 0


def test_transformer_train_mode_dropout(zi):
    enc = _image_encoder(zi)
    x, lens = _t(zi, "images"), _t(zi, "img_lens")
    with torch.no_grad():
        ref = enc(x, lens)
        torch.manual_seed(0)
        train = enc.train()(x, lens)
        assert (train - ref).abs().max() > 1e-3
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        enc.layer.attention.self.dropout = 0.0
        torch.testing.assert_close(enc(x, lens), ref, rtol=0, atol=1e-12)


def test_transformer_contract_names(zi):
    names = set(TransformerImageEncoder(24, 32, 16, 64).state_dict())
    expected = {n[len("image_encoder.") :] for n in saem_image_contract(zi)}
    assert names == expected


# --- the angular loss and the penalty -----------------------------------------------------------


def _angular_by_hand(a, p, tb, hardest=True):
    total = 0.0
    for anchor, pos in ((a, p), (p, a)):
        for i in range(len(a)):
            fs = [
                4 * tb * float((anchor[i] + pos[i]) @ pos[j])
                - 2 * (1 + tb) * float(anchor[i] @ pos[i])
                for j in range(len(a))
                if j != i
            ]
            total += (
                math.log1p(math.exp(max(fs))) if hardest else math.log1p(sum(map(math.exp, fs)))
            )
    return total


def test_angular_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    for tb in (1.0, 0.3):
        for hardest in (True, False):
            loss = AngularLoss(angle_bound=tb, max_violation=hardest)(a, p)
            assert float(loss) == pytest.approx(_angular_by_hand(a, p, tb, hardest), rel=1e-12)
    assert float(AngularLoss()(a[:1], p[:1])) == 0.0  # no negative


def test_angular_weight_schedule():
    aux = AngularLoss()
    weights = [aux.weight_at(e) for e in range(23)]
    expected = [0.5] * 5 + [0.05] * 5 + [0.005] * 5 + [0.0005] * 5 + [5e-5, 0.0, 0.0]
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[21] == 0.0 and weights[22] == 0.0


def test_weight_norm_penalty_sums_frobenius_norms_of_weight_matrices():
    m = torch.nn.Sequential(
        torch.nn.Linear(3, 2),
        torch.nn.LayerNorm(2),
        torch.nn.Embedding(4, 2),
        torch.nn.Conv1d(2, 2, 3),
    )
    expected = sum(float(m[i].weight.detach().norm()) for i in (0, 2, 3))
    assert float(weight_norm_penalty(m).detach()) == pytest.approx(expected, rel=1e-6)
    assert float(weight_norm_penalty(torch.nn.LayerNorm(3))) == 0.0


def test_training_step_adds_angular_and_penalty(saem_module, zi, zt):
    """loss = contrastive + alpha(epoch) x angular + 0.01 x sum ||W|| (dropout off)."""
    m = saem_module
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m.image_encoder.layer.attention.self.dropout = 0.0
    m.text_encoder.bert.config.attention_probs_dropout_prob = 0.0
    m.eval()  # BERT's own dropout off too; the step's arithmetic is what is checked
    batch = {
        "images": _t(zi, "images"),
        "img_lens": _t(zi, "img_lens"),
        "captions": _t(zt, "tokens"),
        "cap_lens": _t(zt, "cap_lens"),
        "img_ids": torch.arange(4),
        "cap_ids": torch.arange(4),
    }
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.optimizers = lambda: type("O", (), {"param_groups": [{"lr": 1.0}]})()
    with torch.no_grad():
        loss = m.training_step(batch, 0)
    a, p = _t(zi, "img_emb"), _t(zt, "cap_emb")
    contrastive = m.criterion(a @ p.T)
    expected = contrastive + 0.5 * AngularLoss()(a, p) + 0.01 * float(zi["weight_norm_sum"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-7)
    assert float(logged["train/weight_norm"]) == pytest.approx(
        float(zi["weight_norm_sum"]), rel=1e-9
    )


def test_groups_instantiate_at_small_sizes(compose, fixture_bert):
    cfg = compose(
        [
            "model/image_encoder=transformer",
            "model/text_encoder=bert_cnn",
            f"model.text_encoder.path={fixture_bert}",
            "model/aux=angular",
            "model.embed_size=16",
            "model.text_encoder.channels=4",
        ]
    )
    assert isinstance(instantiate(cfg.model.image_encoder), TransformerImageEncoder)
    assert isinstance(instantiate(cfg.model.text_encoder), BertCNNTextEncoder)
    assert isinstance(instantiate(cfg.model.aux), AngularLoss)


def test_saem_recipe_trains_end_to_end(compose, tiny_bert, tmp_path):
    """The SAEM recipe runs end to end at small sizes (a tiny BERT from a local directory, its
    tokenizer, no gradient clipping), logging the angular loss and the weight norms."""
    import csv

    from omegaconf import open_dict

    from itm.train import train

    cfg = compose(
        [
            "experiment=saem_f30k",
            "debug=fast",
            f"model.text_encoder.path={tiny_bert}",
            "model.embed_size=32",
            "model.text_encoder.channels=8",
            "model.image_encoder.ffn_dim=64",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg)
    assert "test/rsum" in metrics and "dev/best_rsum" in metrics
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for key in ("train/aux_loss", "train/weight_norm"):
        assert any(r.get(key) for r in rows), key
