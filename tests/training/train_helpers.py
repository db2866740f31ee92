"""Small configurations that run the real training loop on the bundled data in seconds."""

import io
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from sam2_peft.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = str(REPO / "examples" / "data")
HERE = Path(__file__).resolve().parent


def tiny_config(output_dir, **overrides) -> TrainConfig:
    """A 4-step tiny-random run on the sample data; every field can be overridden."""
    fields = dict(
        model="tiny-random",
        data=SAMPLE_DATA,
        strategy="lora",
        output_dir=str(output_dir),
        max_steps=4,
        batch_size=2,
        eval_steps=4,
        logging_steps=1,
        max_objects_per_image=3,
        seed=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def final_tensors(output_dir) -> dict:
    """The tensors a run saved in `final/`, whichever format its strategy writes."""
    final = Path(output_dir) / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "trained_tensors.safetensors"
    return load_file(final / name)


def small_sample(root: Path, train: int = 6, val: int = 2) -> str:
    """Copy the first `train` and `val` image/mask pairs of the sample data into `root`; return its path.

    Fewer images make short epochs, so a run of a few steps crosses epoch boundaries.
    """
    for split, count in (("train", train), ("val", val)):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
            for path in sorted((Path(SAMPLE_DATA) / split / kind).iterdir())[:count]:
                shutil.copy(path, root / split / kind / path.name)
    return str(root)


def killed_while_saving_command(python: str, checkpoint: str, argv: list[str]) -> list[str]:
    """The command line that runs `sam2-peft <argv>` and kills itself while writing `checkpoint` (a folder name)."""
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import train_helpers; "
        "train_helpers.run_killed_while_saving(sys.argv[1], sys.argv[2:])"
    )
    return [python, "-c", code, checkpoint, *argv]


def run_killed_while_saving(checkpoint: str, argv: list[str]) -> None:
    """Run `sam2-peft <argv>` in this process and SIGKILL it halfway through writing `<checkpoint>/optimizer.bin`.

    `save_state` writes the model weights first, then the optimiser: the folder is left as a kill at that moment
    leaves it, with complete weights, half an optimiser file, no scheduler, RNG or training state, and no
    completion marker.
    """
    import accelerate.checkpointing

    from sam2_peft.cli import main

    save = accelerate.checkpointing.save

    def save_until_killed(obj, path, *args, **kwargs):
        path = Path(path)
        if path.parent.name == checkpoint and path.name == "optimizer.bin":
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            path.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, path, *args, **kwargs)

    accelerate.checkpointing.save = save_until_killed
    main(argv)
