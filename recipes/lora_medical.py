"""LoRA on SAM2's Hiera trunk for medical images (breast ultrasound by default).

    accelerate launch recipes/lora_medical.py
    accelerate launch recipes/lora_medical.py --config recipes/configs/lora_medical.yaml --lora_r 16

Writes runs/lora_medical/final/ (a PEFT adapter), metrics.json, checkpoints/ and training_curves.png.
"""

import sys
from pathlib import Path

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.errors import run_command
from sam2_peft.finetune import finetune

CONFIG = Path(__file__).parent / "configs" / "lora_medical.yaml"


def main(cfg: TrainConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    # A user error (bad data, a wrong flag) ends with its message and exit status 2; --debug shows the traceback.
    run_command(lambda argv: main(parse_config(argv, default_config=CONFIG)), sys.argv[1:], prog=Path(__file__).name)
