"""LoRA on SAM2's Hiera trunk for medical images (breast ultrasound by default).

    accelerate launch recipes/lora_medical.py
    accelerate launch recipes/lora_medical.py --config recipes/configs/lora_medical.yaml --lora_r 16

Writes runs/lora_medical/final/ (a PEFT adapter), metrics.json, checkpoints/ and training_curves.png.
"""

import sys
from pathlib import Path

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.finetune import finetune


def main(cfg: TrainConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], default_config=Path(__file__).parent / "configs" / "lora_medical.yaml"))
