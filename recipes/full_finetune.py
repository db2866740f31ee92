"""Train every weight of SAM2.

    accelerate launch recipes/full_finetune.py
    accelerate launch recipes/full_finetune.py --config recipes/configs/full_finetune.yaml --data path/to/your/data

Writes runs/full_finetune/final/ (the trained tensors and the base's name), metrics.json, checkpoints/ and plots.
"""

import sys
from pathlib import Path

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.finetune import finetune


def main(cfg: TrainConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], default_config=Path(__file__).parent / "configs" / "full_finetune.yaml"))
