"""A run's state on disk: resumable checkpoints, the best weights so far, and the final model.

    save_checkpoint(accelerator, state)        # save_state into DIR/checkpoints/, then the completion marker
    resume(accelerator, state, "latest", DIR / "checkpoints")
    save_trainable(accelerator, module, DIR / "best" / "trainable.safetensors", step)

A checkpoint folder counts only once its completion marker exists: a run killed while saving leaves one without,
which `latest_checkpoint` skips and `resume` removes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sam2_peft.config import TrainConfig
from sam2_peft.errors import MissingFileError, OutputExistsError
from sam2_peft.hub import atomic_file
from sam2_peft.models import load_sam2
from sam2_peft.strategies import apply_strategy
from sam2_peft.training import COMPLETE_MARKER, TrainState, latest_checkpoint


def final_model(accelerator: Accelerator, module, cfg: TrainConfig, best_path: Path, best_step: int | None):
    """The trained model with the best weights restored, whole on the main process (None on the others under FSDP)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        unwrapped = accelerator.unwrap_model(module)
        if best_step is not None:
            restore_trainable(unwrapped, best_path, best_step)
        return unwrapped.segmenter.model
    # FSDP shards the parameters: gather them (a collective call), then rebuild an unsharded copy on the main process.
    state_dict = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    base = load_sam2(cfg.model, revision=cfg.revision, sam2_config=cfg.sam2_config, hub_kernels=cfg.hub_kernels,
                     video=cfg.task == "video")
    # The same wrapper (`InteractiveSegmenter` or `ClipSegmenter`), so the gathered state dict's keys fit.
    rebuilt = type(accelerator.unwrap_model(module))(apply_strategy(base, cfg.strategy, **cfg.strategy_options()))
    rebuilt.load_state_dict(state_dict)
    if best_step is not None:
        restore_trainable(rebuilt, best_path, best_step)
    return rebuilt.segmenter.model


def resume(accelerator: Accelerator, state: TrainState, where: str, checkpoints_dir: Path) -> None:
    """Load the state saved at `where` ('latest' or a folder) and drop checkpoints a killed run left half-written."""
    path = latest_checkpoint(checkpoints_dir) if where == "latest" else Path(where)
    if path is None or not (path / COMPLETE_MARKER).is_file():
        raise MissingFileError(
            f"--resume_from_checkpoint {where}: no complete checkpoint "
            f"{'in ' + str(checkpoints_dir) if path is None else 'at ' + str(path)}."
        )
    accelerator.load_state(str(path))
    # accelerate names the next checkpoint by its save counter, which load_state does not restore.
    accelerator.project_configuration.iteration = state.checkpoints_saved
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for partial in checkpoints_dir.glob("checkpoint_*"):
            if not (partial / COMPLETE_MARKER).is_file():
                accelerator.print(f"Removing {partial}: a checkpoint the interrupted run did not finish writing.")
                shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    following = checkpoints_dir / f"checkpoint_{state.checkpoints_saved}"
    if following.exists():
        raise OutputExistsError(
            f"--resume_from_checkpoint {where}: later checkpoints ({following}, ...) exist in {checkpoints_dir}. "
            "Resume from 'latest', or move the later ones away to branch from this one."
        )
    accelerator.print(f"Resumed from {path} at step {state.step}.")


def save_checkpoint(accelerator: Accelerator, state: TrainState) -> None:
    """`save_state` into checkpoints/, then mark the folder complete once every process has written its part."""
    state.checkpoints_saved += 1
    path = Path(accelerator.save_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The marker holds the step, which orders checkpoints for `latest` whatever their folder names and times.
        with atomic_file(path / COMPLETE_MARKER) as marker:  # a kill never leaves an empty marker
            marker.write_text(str(state.step))


def save_trainable(accelerator: Accelerator, module: torch.nn.Module, path: Path, step: int) -> None:
    """Write the trainable tensors (gathered on the main process, whatever the sharding) with their step."""
    trainable = {name for name, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad}
    state_dict = accelerator.get_state_dict(module)
    if accelerator.is_main_process:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items() if name in trainable}
        with atomic_file(path) as temporary:
            save_file(tensors, temporary, metadata={"step": str(step)})


def restore_trainable(module: torch.nn.Module, path: Path, step: int) -> None:
    """Load the best weights saved at `step` into `module`, refusing a file from another step or with other keys."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: it holds the best weights (step {step}), which the final model restores. Resume in "
            "the output_dir the run wrote, with best/ next to checkpoints/, or retrain."
        )
    with safe_open(path, framework="pt") as handle:
        saved_step = int(handle.metadata()["step"])
    if saved_step != step:
        raise RuntimeError(
            f"{path} holds the weights of step {saved_step}, but the best validation was at step {step}; it was "
            "overwritten by a run that did not finish. Resume from an earlier checkpoint or retrain."
        )
    missing, unexpected = module.load_state_dict(load_file(path), strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"{path} does not fit the model: missing {sorted(trainable & set(missing))[:5]}, "
                           f"unexpected {unexpected[:5]}.")


def write_json(path: Path, payload: dict) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))
