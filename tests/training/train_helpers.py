"""Small configurations that run the real training loop on the bundled data in seconds."""

from pathlib import Path

from safetensors.torch import load_file

from sam2_peft.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = str(REPO / "examples" / "data")


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
