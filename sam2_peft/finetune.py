"""One fine-tuning run, in accelerate's canonical order: Accelerator, seed, data, model, optimiser, `prepare`, loop,
evaluation, save. Every recipe and `sam2-peft train` run this.

    accelerate launch recipes/lora_medical.py --config recipes/configs/lora_medical.yaml
    sam2-peft train --config recipes/configs/quickstart.yaml --output_dir runs/quickstart
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sam2_peft.caching import plan_cache, preprocessing_key
from sam2_peft.config import TrainConfig
from sam2_peft.data import AugmentConfig, Preprocessor, PromptConfig, SegmentationDataset, collate_objects
from sam2_peft.hub import atomic_file, save_adapter, write_preprocessing
from sam2_peft.memory import enable_gradient_checkpointing
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.strategies import apply_strategy, trainable_summary
from sam2_peft.training import (
    COMPLETE_MARKER,
    InteractiveSegmenter,
    TrainState,
    build_optimizer,
    build_scheduler,
    compute_loss,
    initialise_optimizer_state,
    latest_checkpoint,
    loss_weights,
    peak_memory_mb,
    plot_history,
    validate,
)

logger = logging.getLogger(__name__)
TRACKERS = {"none": None, "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": "all"}


def finetune(cfg: TrainConfig) -> dict:
    """Fine-tune SAM2 as `cfg` says and write `final/`, `metrics.json`, `checkpoints/` and plots to `cfg.output_dir`.

    `final/` holds the best validation's weights (restored at the end).

    Returns:
        The content of `metrics.json`: `baseline` (before training), `last` (the last validation) and `best`
        validation metrics, `best_step`, `steps`, `nonfinite_steps` and `throughput`.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # Some CPU backward kernels (index accumulation) otherwise add in a thread-dependent order.
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _run(cfg)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        # accelerate keeps its settings (mixed precision, ...) in a process-wide singleton: clear them so that
        # another run in this process (tests, `compare` without isolation) may choose its own.
        AcceleratorState._reset_state()


def _run(cfg: TrainConfig) -> dict:
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Without a GPU, accelerate only goes multi-process (gloo) when told it runs on CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=TRACKERS[cfg.report_to],
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=cfg.checkpoint_total_limit,
        ),
        # A seeded sampler gives every epoch the same order on every run, which resuming relies on.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Multimask training leaves the single-mask output head without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(cfg.seed)
    cfg = copy.copy(cfg)  # the saved config records the precision accelerate settled on, whatever chose it
    cfg.mixed_precision = accelerator.mixed_precision
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / "config.yaml")
        if ignored := cfg.ignored_options():
            logger.warning("Strategy %r does not use %s; they have no effect.", cfg.strategy, ", ".join(ignored))

    with accelerator.main_process_first():
        splits = cfg.load_splits(seed=cfg.seed)
    if "val" not in splits:
        raise ValueError(
            f"--data {cfg.data}: no validation split, and none could be held out (--val_fraction {cfg.val_fraction}, "
            f"{len(splits['train'])} training rows); add a val/ split or raise --val_fraction."
        )

    model = load_sam2(cfg.model, revision=cfg.revision, sam2_config=cfg.sam2_config, hub_kernels=cfg.hub_kernels)
    base_fingerprint = model_fingerprint(model)
    model = apply_strategy(model, cfg.strategy, **cfg.strategy_options())
    if accelerator.is_main_process:
        logger.info("Trainable parameters (%s):\n%s", cfg.strategy, trainable_summary(model))
    if cfg.gradient_checkpointing:
        blocks = enable_gradient_checkpointing(
            model, strips=cfg.checkpoint_strips, objects_per_checkpoint=cfg.objects_per_checkpoint
        ) - 1
        accelerator.print(f"Gradient checkpointing: {blocks} Hiera blocks (windowed ones in {cfg.checkpoint_strips} "
                          f"strip(s)) and the mask decoder ({cfg.objects_per_checkpoint} object(s) per checkpoint).")
    module = InteractiveSegmenter(model)
    if cfg.compile:
        module.segmenter.compile_decoder()

    preprocessor = Preprocessor.from_model(model)
    common = dict(
        mask_type=cfg.mask_type,
        num_classes=cfg.num_classes,
        min_object_area=cfg.min_object_area,
        max_objects_per_image=cfg.max_objects_per_image,
        intensity=cfg.intensity_config(),
        seed=cfg.seed,
    )
    prompts = PromptConfig(box_prob=cfg.box_probability, box_noise=cfg.box_jitter, num_positive=cfg.num_points)
    train_set = SegmentationDataset(
        splits["train"],
        preprocessor,
        keep_empty_images=cfg.keep_empty_images,
        augment=AugmentConfig() if cfg.augment else None,
        prompts=prompts,
        split="train",
        **common,
    )
    val_set = SegmentationDataset(splits["val"], preprocessor, prompts="box", split="val", **common)
    plan = plan_cache(
        model,
        changes_pixels=train_set.changes_pixels,
        enabled=cfg.cache_features,
        num_views=cfg.cache_views,
        num_images=len(train_set),
    )
    accelerator.print(plan.message)
    if plan.kind is not None and train_set.changes_pixels:
        train_set.augment_views = plan.num_views
    train_cache = plan.build(base_fingerprint, preprocessing_key(train_set), directory=cfg.cache_dir)
    val_cache = plan.build(base_fingerprint, preprocessing_key(val_set), directory=cfg.cache_dir)
    loader_options = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_objects)
    train_loader = DataLoader(train_set, shuffle=True, **loader_options)
    val_loader = DataLoader(val_set, shuffle=False, **loader_options)

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    module, optimizer, train_loader, val_loader = accelerator.prepare(module, optimizer, train_loader, val_loader)
    initialise_optimizer_state(optimizer)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_ratio, accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    eval_steps = cfg.eval_steps or steps_per_epoch
    checkpoint_steps = cfg.checkpoint_steps or eval_steps
    if cfg.report_to != "none":
        accelerator.init_trackers("sam2-peft", config=json.loads(cfg.to_json()))

    checkpoints_dir = output_dir / "checkpoints"
    if cfg.resume_from_checkpoint:
        _resume(accelerator, state, cfg.resume_from_checkpoint, checkpoints_dir)
    elif any(checkpoints_dir.glob("checkpoint_*")):
        raise FileExistsError(
            f"{checkpoints_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue "
            "it, or choose another --output_dir."
        )

    def attach_cache(batch: dict, cache, view: int = 0) -> None:
        segmenter = accelerator.unwrap_model(module).segmenter
        if plan.kind == "features":
            batch["image_features"] = cache.features(segmenter, batch, view=view)
        else:
            batch["image_prefix"] = cache.prefix(segmenter, batch, view=view)
            batch["prefix_start_block"] = plan.start_block

    attach_val = None if val_cache is None else (lambda batch: attach_cache(batch, val_cache))
    if state.step == 0 and not state.history:
        baseline = validate(module, val_loader, accelerator, attach_cache=attach_val, seed=cfg.seed)
        state.history.append({"step": 0, **baseline})
        accelerator.print(f"Before training: dice {baseline['dice']:.4f}, iou {baseline['iou']:.4f}")

    weights = loss_weights(cfg)
    best_path = output_dir / "best" / "trainable.safetensors"
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    window = {"loss": 0.0, "count": 0, "images": 0, "start": time.perf_counter()}
    stop = state.step >= total_steps or state.should_stop(cfg.early_stopping_patience)
    module.train()
    while not stop:
        train_loader.set_epoch(state.epoch)
        train_set.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in loader:
            if train_cache is not None:
                attach_cache(batch, train_cache, plan.view(state.epoch))
            with accelerator.accumulate(module):
                # Dropout and correction clicks draw from generators seeded by the step, so a resumed run draws the
                # same numbers whatever else (a new DataLoader iterator, say) consumed the global RNG meanwhile.
                step_seed = cfg.seed * 1_000_003 + state.batches_in_epoch * 7_919 + state.step * 97
                torch.manual_seed(step_seed + accelerator.process_index)
                clicks = torch.Generator(device=batch["masks"].device)
                clicks.manual_seed(step_seed + accelerator.process_index)
                # accelerate autocasts the forward of DDP models but not of FSDP2 ones (mixed precision is a sharding
                # policy there), and SAM2 mixes fp32 buffers into its activations: autocast explicitly.
                with accelerator.autocast():
                    outputs = module(batch, correction_rounds=cfg.correction_rounds, generator=clicks)
                local_objects = torch.tensor([float(len(batch["image_index"]))], device=accelerator.device)
                losses = compute_loss(outputs, batch, weights, accelerator.gather(local_objects).mean())
                finite = accelerator.gather(torch.isfinite(losses["loss"].detach())[None]).all()
                if finite:
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            window["images"] += len(batch["image_ids"]) * accelerator.num_processes
            if finite:
                state.nonfinite_in_row = 0
                window["loss"] += losses["loss"].item()
                window["count"] += 1
            else:
                state.nonfinite_in_row += 1
                state.nonfinite_total += 1
                accelerator.print(
                    f"Step {state.step}: non-finite loss; this batch's update is skipped ({state.nonfinite_total} so far)."
                )
                if state.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{state.nonfinite_in_row} non-finite losses in a row (--max_nonfinite_steps "
                        f"{cfg.max_nonfinite_steps}); lower --learning_rate, use --mixed_precision bf16 instead of "
                        "fp16, or check the data with `sam2-peft data`."
                    )
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % cfg.logging_steps == 0 and window["count"]:
                elapsed = time.perf_counter() - window["start"]
                row = {
                    "step": state.step,
                    "loss": window["loss"] / window["count"],
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": window["images"] / elapsed,
                    "peak_memory_mb": peak_memory_mb(accelerator.device),
                }
                state.history.append(row)
                accelerator.log(row, step=state.step)
                progress.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    img_s=f"{row['images_per_s']:.1f}",
                    mem_mb=f"{row['peak_memory_mb']:.0f}",
                )
                window = {"loss": 0.0, "count": 0, "images": 0, "start": time.perf_counter()}
            if state.step % eval_steps == 0 or state.step == total_steps:
                scores = validate(module, val_loader, accelerator, cfg.correction_rounds, attach_val, cfg.seed)
                state.history.append({"step": state.step, **scores})
                accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=state.step)
                accelerator.print(f"step {state.step}: val dice {scores['dice']:.4f}, iou {scores['iou']:.4f}")
                if state.record_eval(scores[cfg.eval_metric]):
                    _save_trainable(accelerator, module, best_path, state.step)
                    if accelerator.is_main_process:
                        write_preprocessing(best_path.parent, model, cfg.data_config())
                stop = state.should_stop(cfg.early_stopping_patience) or state.step >= total_steps
                if stop and state.step < total_steps:
                    accelerator.print(f"Early stopping: no {cfg.eval_metric} gain in {cfg.early_stopping_patience} evals.")
            # The last step is checkpointed too, so resuming a finished (or early-stopped) run has nothing to redo.
            if state.step % checkpoint_steps == 0 or stop:
                _checkpoint(accelerator, state)
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    accelerator.wait_for_everyone()
    trained = _final_model(accelerator, module, cfg, best_path, state.best_step)
    evals = [row for row in state.history if "dice" in row]
    best = next(row for row in evals if row["step"] == state.best_step) if state.best_step is not None else evals[-1]
    train_rows = [row for row in state.history if "loss" in row]
    metrics = {
        "baseline": evals[0] if evals[0]["step"] == 0 else None,
        "last": evals[-1],
        "best": best,
        "best_step": state.best_step,
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_total,
        "throughput": {
            "images_per_s": sum(row["images_per_s"] for row in train_rows) / len(train_rows) if train_rows else None,
            "peak_memory_mb": max((row["peak_memory_mb"] for row in train_rows), default=None),
        },
    }
    if accelerator.is_main_process:
        save_adapter(
            trained,
            output_dir / "final",
            base_model_name_or_path=cfg.model,
            base_fingerprint=base_fingerprint,
            strategy=cfg.strategy,
            revision=cfg.revision,
            metrics={k: v for k, v in best.items() if k != "step"},
            data=cfg.data_config(),
        )
        _write_json(output_dir / "metrics.json", metrics)
        _write_json(output_dir / "history.json", {"history": state.history})
        plot_history(state.history, output_dir / "training_curves.png")
    accelerator.end_training()
    return metrics


def _final_model(accelerator: Accelerator, module, cfg: TrainConfig, best_path: Path, best_step: int | None):
    """The trained model with the best weights restored, whole on the main process (None on the others under FSDP)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        unwrapped = accelerator.unwrap_model(module)
        if best_step is not None:
            _restore_trainable(unwrapped, best_path, best_step)
        return unwrapped.segmenter.model
    # FSDP shards the parameters: gather them (a collective call), then rebuild an unsharded copy on the main process.
    state_dict = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    base = load_sam2(cfg.model, revision=cfg.revision, sam2_config=cfg.sam2_config, hub_kernels=cfg.hub_kernels)
    rebuilt = InteractiveSegmenter(apply_strategy(base, cfg.strategy, **cfg.strategy_options()))
    rebuilt.load_state_dict(state_dict)
    if best_step is not None:
        _restore_trainable(rebuilt, best_path, best_step)
    return rebuilt.segmenter.model


def _resume(accelerator: Accelerator, state: TrainState, where: str, checkpoints_dir: Path) -> None:
    """Load the state saved at `where` ('latest' or a folder) and drop checkpoints a killed run left half-written."""
    path = latest_checkpoint(checkpoints_dir) if where == "latest" else Path(where)
    if path is None or not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
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
        raise FileExistsError(
            f"--resume_from_checkpoint {where}: later checkpoints ({following}, ...) exist in {checkpoints_dir}. "
            "Resume from 'latest', or move the later ones away to branch from this one."
        )
    accelerator.print(f"Resumed from {path} at step {state.step}.")


def _checkpoint(accelerator: Accelerator, state: TrainState) -> None:
    """`save_state` into checkpoints/, then mark the folder complete once every process has written its part."""
    state.checkpoints_saved += 1
    path = Path(accelerator.save_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The marker holds the step, which orders checkpoints for `latest` whatever their folder names and times.
        (path / COMPLETE_MARKER).write_text(str(state.step))


def _save_trainable(accelerator: Accelerator, module: torch.nn.Module, path: Path, step: int) -> None:
    """Write the trainable tensors (gathered on the main process, whatever the sharding) with their step."""
    trainable = {name for name, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad}
    state_dict = accelerator.get_state_dict(module)
    if accelerator.is_main_process:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items() if name in trainable}
        with atomic_file(path) as temporary:
            save_file(tensors, temporary, metadata={"step": str(step)})


def _restore_trainable(module: torch.nn.Module, path: Path, step: int) -> None:
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


def _write_json(path: Path, payload: dict) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))
