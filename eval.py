"""Evaluate checkpoints: ``python eval.py ckpt_path=... [data=...] protocol=f30k``."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from itm.evaluate import evaluate, with_output_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    metrics = evaluate(with_output_dir(cfg, HydraConfig.get().runtime.output_dir))
    return next((v for k, v in metrics.items() if k.endswith("/rsum")), None)


if __name__ == "__main__":
    main()
