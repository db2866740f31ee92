"""Run one training process of a DDP test and save this rank's trainable tensors (launched by torchrun)."""

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from sam2_peft.config import parse_config  # noqa: E402
from sam2_peft.finetune import finetune  # noqa: E402
from sam2_peft.segmenter import base_sam2  # noqa: E402

import sam2_peft.tasks as tasks_module  # noqa: E402

captured = {}


def recording(module_class):
    """`module_class` (the image or the video training module), remembering the model it wraps."""

    class Recording(module_class):
        def __init__(self, model, **options):
            super().__init__(model, **options)
            captured["model"] = model

    return Recording


tasks_module.InteractiveSegmenter = recording(tasks_module.InteractiveSegmenter)
tasks_module.ClipSegmenter = recording(tasks_module.ClipSegmenter)
cfg = parse_config(sys.argv[1:])
finetune(cfg)
rank = PartialState().process_index
tensors = {n: p.detach().contiguous() for n, p in captured["model"].named_parameters() if p.requires_grad}
save_file(tensors, Path(cfg.output_dir) / f"rank{rank}.safetensors")
print("distributed type:", PartialState().distributed_type, "base:", type(base_sam2(captured["model"])).__name__)
