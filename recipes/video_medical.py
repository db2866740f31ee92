"""LoRA on SAM2's trunk and memory attention for CT volumes, tracked slice by slice (spleen CT by default).

    accelerate launch recipes/video_medical.py --data data/spleen_ct
    accelerate launch recipes/video_medical.py --config recipes/configs/video_medical.yaml --clip_length 16

Each training step prompts the organ on a clip's first slice (a box or clicks) and tracks it through the rest with
SAM2's memory; validation tracks whole volumes. Writes runs/video_medical/final/ (a PEFT adapter for the video
model), metrics.json (J, F, J&F, Dice), checkpoints/ and training_curves.png. Then:

    sam2-peft eval --task video --model facebook/sam2.1-hiera-tiny --adapter runs/video_medical/final --data data/spleen_ct
    sam2-peft track --model facebook/sam2.1-hiera-tiny --adapter runs/video_medical/final \\
        --video data/spleen_ct/images/spleen_2.nii.gz --box 120,200,180,260 --frame 40 --output runs/tracked
"""

import sys
from pathlib import Path

from sam2_peft.config import TrainConfig, parse_config
from sam2_peft.errors import run_command
from sam2_peft.finetune import finetune

CONFIG = Path(__file__).parent / "configs" / "video_medical.yaml"


def main(cfg: TrainConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    # A user error (bad data, a wrong flag) ends with its message and exit status 2; --debug shows the traceback.
    run_command(lambda argv: main(parse_config(argv, default_config=CONFIG)), sys.argv[1:], prog=Path(__file__).name)
