"""Train every weight of SAM2.

    accelerate launch recipes/full_finetune.py
    accelerate launch recipes/full_finetune.py --config recipes/configs/full_finetune.yaml --data path/to/your/data

Writes runs/full_finetune/final/ (the trained tensors and the base's name), metrics.json, checkpoints/ and plots.
"""

import sys
from pathlib import Path

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.errors import run_command
from sam2_peft.finetune import finetune

CONFIG = Path(__file__).parent / "configs" / "full_finetune.yaml"


def main(cfg: TrainConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    # A user error (bad data, a wrong flag) ends with its message and exit status 2; --debug shows the traceback.
    run_command(lambda argv: main(parse_config(argv, default_config=CONFIG)), sys.argv[1:], prog=Path(__file__).name)
