"""One fine-tuning run, in accelerate's canonical order: Accelerator, seed, data, model, optimiser, `prepare`, loop,
evaluation, save. Every recipe and `sam2-peft train` run this.

    accelerate launch recipes/lora_medical.py --config recipes/configs/lora_medical.yaml
    sam2-peft train --config recipes/configs/quickstart.yaml --output_dir runs/quickstart
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sam2_peft.checkpoints import final_model, resume, save_checkpoint, save_trainable, write_json
from sam2_peft.config import TrainConfig
from sam2_peft.errors import ConfigError, OutputExistsError
from sam2_peft.hub import save_adapter, write_preprocessing
from sam2_peft.memory import enable_gradient_checkpointing
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.reports import plot_history
from sam2_peft.strategies import apply_strategy, trainable_summary
from sam2_peft.tasks import TASKS, RunParts
from sam2_peft.training import (
    LossWindow,
    TrainState,
    build_optimizer,
    build_scheduler,
    initialise_optimizer_state,
    peak_memory_mb,
)

logger = logging.getLogger(__name__)
TRACKERS = {"none": None, "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": "all"}


def finetune(cfg: TrainConfig) -> dict:
    """Fine-tune SAM2 as `cfg` says and write `final/`, `metrics.json`, `checkpoints/` and plots to `cfg.output_dir`.

    `final/` holds the best validation's weights (restored at the end). accelerate keeps its settings in a
    process-wide state, so runs in one process share their mixed precision (accelerate's rule).

    Returns:
        The content of `metrics.json`: `baseline` (before training), `last` (the last validation) and `best`
        validation metrics, `best_step`, `steps`, `nonfinite_steps` and `throughput`.
    """
    with deterministic_algorithms(cfg.deterministic):
        accelerator = build_accelerator(cfg)
        set_seed(cfg.seed)
        cfg = record_config(accelerator, cfg)
        with accelerator.main_process_first():
            splits = TASKS[cfg.task].load_splits(cfg)
        model, base_fingerprint = build_model(accelerator, cfg)
        run = build_run(accelerator, cfg, splits, model, base_fingerprint)
        start_or_resume(run)
        train(run)
        metrics = save_outputs(run)
        accelerator.end_training()
        return metrics


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Deterministic kernels inside (some CPU backward kernels otherwise add in a thread-dependent order)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's `Accelerator`: precision, accumulation, trackers and numbered checkpoints in `output_dir`."""
    output_dir = Path(cfg.output_dir)
    return Accelerator(
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
        # A seeded sampler gives every epoch the same order on every run, which resuming relies on; on a GPU the
        # batches come from pinned memory, so their copies need not wait (`loader_options`).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        # Multimask training leaves the single-mask output head without gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def record_config(accelerator: Accelerator, cfg: TrainConfig) -> TrainConfig:
    """Save the effective config (with the precision accelerate settled on) as `output_dir/config.yaml`."""
    cfg = copy.copy(cfg)
    cfg.mixed_precision = accelerator.mixed_precision
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(cfg.output_dir) / "config.yaml")
        if ignored := cfg.ignored_options():
            logger.warning("Strategy %r does not use %s; they have no effect.", cfg.strategy, ", ".join(ignored))
    return cfg


def build_model(accelerator: Accelerator, cfg: TrainConfig):
    """Load the base, apply the strategy (and checkpointing); returns the model and the base's fingerprint."""
    model = load_sam2(cfg.model, revision=cfg.revision, sam2_config=cfg.sam2_config, hub_kernels=cfg.hub_kernels,
                      video=cfg.task == "video")
    base_fingerprint = model_fingerprint(model)
    model = apply_strategy(model, cfg.strategy, **cfg.strategy_options())
    if accelerator.is_main_process:
        logger.info("Trainable parameters (%s):\n%s", cfg.strategy, trainable_summary(model))
    if cfg.gradient_checkpointing:
        blocks = enable_gradient_checkpointing(
            model, strips=cfg.checkpoint_strips, objects_per_checkpoint=cfg.objects_per_checkpoint,
            backend=cfg.backend,
        ) - 1
        accelerator.print(f"Gradient checkpointing: {blocks} Hiera blocks (windowed ones in {cfg.checkpoint_strips} "
                          f"strip(s)) and the mask decoder ({cfg.objects_per_checkpoint} object(s) per checkpoint).")
    return model, base_fingerprint


@dataclass
class Run:
    """What the stages of one run share: the prepared objects, the data, the caches and the schedule."""

    cfg: TrainConfig
    accelerator: Accelerator
    task: object  # `tasks.ImageTask` or `tasks.VideoTask`: what differs between image and video runs
    parts: RunParts  # the task's datasets and caches
    model: torch.nn.Module  # the strategy's model (PEFT or plain), inside `module`
    module: torch.nn.Module  # the prepared `InteractiveSegmenter` (images) or `ClipSegmenter` (video)
    base_fingerprint: str
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    eval_steps: int
    checkpoint_steps: int
    state: TrainState = field(default_factory=TrainState)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best" / "trainable.safetensors"


def build_run(accelerator: Accelerator, cfg: TrainConfig, splits, model, base_fingerprint: str) -> Run:
    """Datasets, caches, optimiser and schedule, then one `accelerator.prepare`."""
    if "val" not in splits:
        raise ConfigError(
            f"--data {cfg.data}: no validation split, and none could be held out (--val_fraction {cfg.val_fraction}, "
            f"{len(splits['train'])} training rows); add a val/ split or raise --val_fraction."
        )
    task = TASKS[cfg.task]
    parts = task.build(cfg, model, splits, base_fingerprint, accelerator)
    accelerator.print(parts.message)
    options = dict(batch_size=cfg.batch_size, collate_fn=parts.collate,
                   **loader_options(cfg.num_workers, accelerator.device, accelerator.num_processes))
    train_loader = DataLoader(parts.train_set, shuffle=True, **options)
    val_loader = DataLoader(parts.val_set, shuffle=False, **options)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    module, optimizer, train_loader, val_loader = accelerator.prepare(parts.module, optimizer, train_loader, val_loader)
    initialise_optimizer_state(optimizer)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = accelerator.prepare(build_scheduler(optimizer, total_steps, cfg.warmup_ratio, accelerator.num_processes))
    eval_steps = cfg.eval_steps or steps_per_epoch
    return Run(
        cfg=cfg, accelerator=accelerator, task=task, parts=parts, model=model, module=module,
        base_fingerprint=base_fingerprint, train_loader=train_loader, val_loader=val_loader, optimizer=optimizer,
        scheduler=scheduler, total_steps=total_steps, eval_steps=eval_steps,
        checkpoint_steps=cfg.checkpoint_steps or eval_steps,
    )  # fmt: skip


def loader_options(num_workers: int | None, device: torch.device, num_processes: int) -> dict:
    """Worker processes, pinned memory and prefetching for the DataLoaders: none on CPU (workers would take the
    cores the training uses), on a GPU enough workers to keep it fed, so decoding and resizing overlap the steps."""
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = min(8, (os.cpu_count() or 1) // num_processes) if cuda else 0
    options = {"num_workers": num_workers, "pin_memory": cuda}
    if num_workers > 0:
        # Not persistent: `set_epoch` must reach the workers (see `data.batching`).
        options.update(prefetch_factor=4, persistent_workers=False)
    return options


def start_or_resume(run: Run) -> None:
    """Register the train state, start trackers, resume (or refuse a folder with an earlier run's checkpoints), and
    validate the untrained model once at step 0."""
    accelerator, cfg = run.accelerator, run.cfg
    accelerator.register_for_checkpointing(run.state)
    if cfg.report_to != "none":
        accelerator.init_trackers("sam2-peft", config=json.loads(cfg.to_json()))
    checkpoints_dir = run.output_dir / "checkpoints"
    if cfg.resume_from_checkpoint:
        resume(accelerator, run.state, cfg.resume_from_checkpoint, checkpoints_dir)
    elif any(checkpoints_dir.glob("checkpoint_*")):
        raise OutputExistsError(
            f"{checkpoints_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue "
            "it, or choose another --output_dir."
        )
    if run.state.step == 0 and not run.state.history:
        baseline = _validate(run, correction_rounds=0)  # the untrained model on the first prompts alone
        run.state.history.append({"step": 0, **baseline})
        accelerator.print(f"Before training: {_format_scores(baseline)}")


def train(run: Run) -> None:
    """The loop: steps until `total_steps` or early stopping, logging, validating and checkpointing on schedule."""
    state, cfg, accelerator = run.state, run.cfg, run.accelerator
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="train")
    window = LossWindow(state)
    stop = state.step >= run.total_steps or state.should_stop(cfg.early_stopping_patience)
    run.module.train()
    while not stop:
        for batch in epoch_batches(run):
            losses = train_step(run, batch)
            state.batches_in_epoch += 1
            images, clips = run.task.num_images(batch)
            window.add(losses, images=images * accelerator.num_processes, clips=clips * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % cfg.logging_steps == 0 and window.count:
                log_losses(run, window.flush(), progress)
            stop = evaluate_and_maybe_stop(run)
            # The last step is checkpointed too, so resuming a finished (or early-stopped) run has nothing to redo.
            if state.step % run.checkpoint_steps == 0 or stop:
                window.save()
                save_checkpoint(accelerator, state)
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()


def epoch_batches(run: Run):
    """This epoch's remaining batches (a resumed run skips those it trained on), with cached features attached."""
    run.train_loader.set_epoch(run.state.epoch)
    run.parts.train_set.set_epoch(run.state.epoch)
    for batch in run.accelerator.skip_first_batches(run.train_loader, run.state.batches_in_epoch):
        run.task.prepare_batch(run, batch)
        yield batch


def train_step(run: Run, batch: dict) -> dict[str, torch.Tensor] | None:
    """Forward, loss and (unless it is not finite) backward and update; returns the detached loss terms, or None
    for a skipped non-finite step."""
    accelerator, cfg, state = run.accelerator, run.cfg, run.state
    # Dropout and correction clicks draw from RNGs seeded by the step, so a resumed run draws the same numbers; the
    # global RNG is forked, so the step leaves it as it was.
    step_seed = cfg.seed * 1_000_003 + state.batches_in_epoch * 7_919 + state.step * 97 + accelerator.process_index
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with accelerator.accumulate(run.module), torch.random.fork_rng(devices=devices):
        torch.manual_seed(step_seed)
        clicks = torch.Generator(device=accelerator.device).manual_seed(step_seed)
        local_objects = torch.tensor([float(run.task.num_objects(batch))], device=accelerator.device)
        # accelerate autocasts the forward of DDP models but not of FSDP2 ones (mixed precision is a sharding policy
        # there), and SAM2 mixes fp32 buffers into its activations: autocast explicitly.
        with accelerator.autocast():
            outputs = run.task.forward(run, batch, clicks)
        losses = run.task.loss(outputs, batch, run.cfg, accelerator.gather(local_objects).mean())
        finite = bool(accelerator.gather(torch.isfinite(losses["loss"].detach())[None]).all())
        if finite:
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.module.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
        run.optimizer.zero_grad()
    _count_nonfinite(run, finite)
    return {name: value.detach() for name, value in losses.items()} if finite else None


def _count_nonfinite(run: Run, finite: bool) -> None:
    state, cfg = run.state, run.cfg
    if finite:
        state.nonfinite_in_row = 0
        return
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    run.accelerator.print(
        f"Step {state.step}: non-finite loss; this batch's update is skipped ({state.nonfinite_total} so far)."
    )
    if state.nonfinite_in_row >= cfg.max_nonfinite_steps:
        raise RuntimeError(
            f"{state.nonfinite_in_row} non-finite losses in a row (--max_nonfinite_steps {cfg.max_nonfinite_steps}); "
            "lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check the data with "
            "`sam2-peft data`."
        )


def log_losses(run: Run, means: dict[str, float], progress) -> None:
    """Record a training row (every loss term, learning rate, throughput, memory) in the history and trackers."""
    row = {"step": run.state.step, **means, "lr": run.scheduler.get_last_lr()[0],
           "peak_memory_mb": peak_memory_mb(run.accelerator.device)}
    run.state.history.append(row)
    run.accelerator.log(row, step=run.state.step)
    # The terms as l_<term>: `dice` on the console is the validation metric.
    progress.set_postfix(loss=f"{row['loss']:.4f}", l_focal=f"{row['focal_loss']:.4f}",
                         l_dice=f"{row['dice_loss']:.4f}", l_iou=f"{row['iou_loss']:.4f}",
                         l_obj=f"{row['object_score_loss']:.4f}", lr=f"{row['lr']:.2e}",
                         img_s=f"{row['images_per_s']:.1f}", mem_mb=f"{row['peak_memory_mb']:.0f}")


def evaluate_and_maybe_stop(run: Run) -> bool:
    """Validate on schedule, keep the best weights, and tell whether training ends now."""
    state, cfg, accelerator = run.state, run.cfg, run.accelerator
    if state.step % run.eval_steps and state.step != run.total_steps:
        return False
    scores = _validate(run, cfg.correction_rounds)
    state.history.append({"step": state.step, **scores})
    accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=state.step)
    accelerator.print(f"step {state.step}: val {_format_scores(scores)}")
    if state.record_eval(scores[cfg.eval_metric]):
        save_trainable(accelerator, run.module, run.best_path, state.step)
        if accelerator.is_main_process:
            write_preprocessing(run.best_path.parent, run.model, cfg.data_config())
    stop = state.should_stop(cfg.early_stopping_patience) or state.step >= run.total_steps
    if stop and state.step < run.total_steps:
        accelerator.print(f"Early stopping: no {cfg.eval_metric} gain in {cfg.early_stopping_patience} evals.")
    return stop


def save_outputs(run: Run) -> dict:
    """Restore the best weights and write `final/`, `metrics.json`, `history.json` and the training curves."""
    accelerator, cfg, state = run.accelerator, run.cfg, run.state
    accelerator.wait_for_everyone()
    trained = final_model(accelerator, run.module, cfg, run.best_path, state.best_step)
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
            **({"clips_per_s": sum(row["clips_per_s"] for row in train_rows) / len(train_rows)}
               if train_rows and "clips_per_s" in train_rows[0] else {}),
            "peak_memory_mb": max((row["peak_memory_mb"] for row in train_rows), default=None),
        },
    }
    if accelerator.is_main_process:
        save_adapter(trained, run.output_dir / "final", base_model_name_or_path=cfg.model,
                     base_fingerprint=run.base_fingerprint, strategy=cfg.strategy, revision=cfg.revision,
                     metrics={k: v for k, v in best.items() if k != "step"}, data=cfg.data_config())
        write_json(run.output_dir / "metrics.json", metrics)
        write_json(run.output_dir / "history.json", {"history": state.history})
        plot_history(state.history, run.output_dir / "training_curves.png")
    return metrics


def _format_scores(scores: dict[str, float]) -> str:
    """`dice 0.81, iou 0.70` (images) or `j_and_f 0.77, dice 0.80` (video), for the console."""
    shown = ("j_and_f", "dice") if "j_and_f" in scores else ("dice", "iou")
    return ", ".join(f"{name} {scores[name]:.4f}" for name in shown)


def _validate(run: Run, correction_rounds: int) -> dict[str, float]:
    return run.task.validate(run, correction_rounds)
