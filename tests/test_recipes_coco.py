"""Every paper recipe has its MS-COCO settings in a recipe: a ``<name>_coco`` sibling of the
Flickr30K one, or a header saying the authors use the same settings on both datasets. The
composed COCO configs carry each paper's COCO lr, epochs and decay (docs/foundations.md,
experiments/README.md)."""

from __future__ import annotations

import pytest

from conftest import CONF_DIR

EXPERIMENTS = CONF_DIR / "experiment"

#: recipe family -> (lr, max_epochs, scheduler.step_size) on MS-COCO
COCO_SCHEDULE = {
    "scan_": (5e-4, 20, 10),  # SCAN README: --learning_rate .0005 --num_epochs 20 --lr_update 10
    "bfan_": (5e-4, 20, 15),  # BFAN README: lr 5e-4, 20 epochs, lr_update 15
    "imram_": (5e-4, 30, 15),
    "chan_": (5e-4, 25, 15),  # one recipe for both datasets
    "vse_inf_": (5e-4, 25, 15),  # one recipe for both datasets
    "pfan_": (5e-4, 30, 15),
    "vsrn_": (2e-4, 30, 15),  # lr_update 15 on COCO (10 on Flickr30K)
    "saem_": (1e-4, 30, 10),
    "sgraf_": (2e-4, 20, 10),  # SGRAF README: COCO SGR and SAF 20 epochs, lr_update 10
}
#: further COCO-specific values: recipe family -> {config key: value}
COCO_EXTRA = {
    "scan_i2t_lse": {"model.pooling.lambda_lse": 20.0},
    "imram_": {"model.align.lambda_softmax": 11.0},
}
SAME_ON_COCO = "MS-COCO: the same settings"


def _recipes() -> list[str]:
    names = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
    return [n for n in names if n != "quickstart" and not n.endswith("_coco")]


def coco_recipe(name: str) -> str:
    """The recipe to train ``name`` on MS-COCO."""
    for candidate in (f"{name}_coco", name.replace("_f30k", "_coco")):
        if candidate != name and (EXPERIMENTS / f"{candidate}.yaml").is_file():
            return candidate
    header = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert SAME_ON_COCO in header, (
        f"conf/experiment/{name}.yaml: no {name}_coco.yaml beside it, and its header does not say "
        f"'{SAME_ON_COCO}'"
    )
    return name


def _family(name: str, table: dict) -> list:
    return [v for prefix, v in table.items() if name.startswith(prefix)]


@pytest.mark.parametrize("name", _recipes())
def test_every_recipe_has_its_coco_settings(compose, name):
    from omegaconf import OmegaConf

    coco = coco_recipe(name)
    overrides = [f"experiment={coco}", "data=coco", "paths.coco_dir=/nonexistent"]
    if "bert" in name:
        overrides.append("model.text_encoder.path=/nonexistent")
    cfg = compose(overrides)
    (schedule,) = _family(name, COCO_SCHEDULE)
    lr, epochs, step = schedule
    got = (cfg.model.optimizer.lr, cfg.trainer.max_epochs, cfg.model.scheduler.step_size)
    assert got == pytest.approx((lr, epochs, step)), (coco, got)
    for extra in _family(name, COCO_EXTRA):
        for key, value in extra.items():
            assert OmegaConf.select(cfg, key) == value, (coco, key)
    # the COCO recipe changes nothing but the COCO values: the head and encoders are the same
    base = compose([o.replace(f"experiment={coco}", f"experiment={name}") for o in overrides])
    assert cfg.model.align._target_ == base.model.align._target_
    assert cfg.model.image_encoder._target_ == base.model.image_encoder._target_
    assert cfg.model.text_encoder._target_ == base.model.text_encoder._target_
