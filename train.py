"""Train an image-text matching model: ``python train.py model/align=chan pooling=lse``."""

import sys

import hydra
from omegaconf import DictConfig

from itm.cli import normalize_argv, objective
from itm.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return objective(train(cfg), cfg)


if __name__ == "__main__":
    sys.argv = normalize_argv(sys.argv)
    main()
