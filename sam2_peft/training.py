"""The parts of the accelerate training loop: loss, optimiser, schedule, validation, the loss window, resumable
state and early stopping. `sam2_peft.finetune.finetune` puts them together in accelerate's order.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from sam2_peft.losses import LossWeights, downsample_targets, sam2_multistep_loss
from sam2_peft.metrics.kernels import SCORE_NAMES, segmentation_scores
from sam2_peft.segmenter import SegmenterOutput, best_mask_logits, masks_at_original_size

# Written into a checkpoint folder after `save_state` returns: a run killed mid-save leaves a folder without it,
# which `latest_checkpoint` skips.
COMPLETE_MARKER = "checkpoint_complete"


def loss_weights(cfg) -> LossWeights:
    """The loss term weights of a `TrainConfig`."""
    return LossWeights(focal=cfg.focal_weight, dice=cfg.dice_weight, iou=cfg.iou_weight, object_score=cfg.object_weight)


def compute_loss(
    outputs: list[SegmenterOutput], batch: dict, weights: LossWeights, num_objects: float | None = None
) -> dict[str, torch.Tensor]:
    """SAM2's loss summed over the rounds, against targets brought to the decoder's resolution.

    Args:
        num_objects: the per-object normaliser; under data parallelism the mean object count per process, so that
            averaging the processes' gradients gives the gradient of the global per-object mean.
    """
    targets = downsample_targets(batch["masks"], outputs[0].mask_logits.shape[-2:])
    return sam2_multistep_loss(outputs, targets, batch["object_present"], weights, num_objects=num_objects)


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings (1-D tensors)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("No parameter is trainable; apply a strategy first (apply_strategy).")
    groups = [
        {"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all tensors in one pass: on CPU it is ~3x faster than foreach (a per-tensor loop there).
    fused = trainable[0][1].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused, foreach=None if fused else True)


def initialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a `build_optimizer` AdamW the zero state its first update would create.

    The state is what lazy initialisation makes (step 0, zero moments), so the updates that follow are the same. A
    parameter without a gradient so far (the mask-prompt encoder before any mask prompt, say) would otherwise have no
    state, and FSDP2 refuses to load a checkpoint that lacks the state of a trainable parameter. Call it after
    `accelerator.prepare`, which may replace the parameters with sharded ones.
    """
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amsgrad = any(group.get("amsgrad", False) for group in optimizer.param_groups)
    moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for index, param in enumerate(params):
        if state["state"].get(index):
            continue
        # load_state_dict puts `step` where the optimizer keeps it (the parameter's device when fused).
        state["state"][index] = {"step": torch.tensor(0.0), **{name: torch.zeros_like(param) for name in moments}}
    optimizer.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, num_processes: int = 1):
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to zero.

    accelerate's prepared scheduler advances once per process per optimiser step, so both lengths are counted in
    those units: the schedule is then the same for any number of processes.
    """
    warmup = math.ceil(warmup_ratio * total_steps) * num_processes
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps * num_processes)


@torch.no_grad()
def validate(
    module: nn.Module,
    loader,
    accelerator,
    correction_rounds: int = 0,
    attach_cache: Callable | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean Dice, IoU, precision and recall over all objects of `loader`, at the images' original resolution.

    Per-image records are gathered batch by batch with `gather_for_metrics`, which drops the duplicates that pad the
    last batch under data parallelism. `attach_cache(batch)`, when given, adds cached encoder output to each batch.
    Correction clicks draw from a generator seeded by `seed`, so the same weights always get the same scores.
    """
    module.eval()
    clicks = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    objects = []
    for batch in loader:
        if attach_cache is not None:
            attach_cache(batch)
        with accelerator.autocast():  # as in training (FSDP2 does not autocast by itself)
            outputs = module(batch, correction_rounds=correction_rounds, generator=clicks)
        logits = best_mask_logits(outputs[-1]).float()
        predictions = masks_at_original_size(logits, batch)
        per_image = [[] for _ in batch["image_ids"]]
        for index, (pred, target) in enumerate(zip(predictions, batch["full_masks"])):
            scores = segmentation_scores(pred[None], torch.as_tensor(target, device=pred.device)[None])
            per_image[int(batch["image_index"][index])].append({name: float(scores[name][0]) for name in SCORE_NAMES})
        gathered = accelerator.gather_for_metrics(per_image, use_gather_object=True)
        objects.extend(obj for image in gathered for obj in image)
    module.train()
    if not objects:
        raise ValueError("The validation split produced no object to score; check it with `sam2-peft data`.")
    result = {name: sum(obj[name] for obj in objects) / len(objects) for name in SCORE_NAMES}
    result["num_objects"] = len(objects)
    return result


@dataclass
class TrainState:
    """Everything besides weights, optimiser, scheduler and RNG that a resumed run needs.

    Registered with `accelerator.register_for_checkpointing`, so `save_state`/`load_state` carry it.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    checkpoints_saved: int = 0
    history: list = field(default_factory=list)
    # The loss terms summed since the last log line, and their step count: a run resumed mid-window logs the same.
    window_sums: dict = field(default_factory=dict)
    window_count: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def record_eval(self, metric: float) -> bool:
        """Track the validation metric (higher is better); return whether it improved on the best so far."""
        improved = self.best_metric is None or metric > self.best_metric
        if improved:
            self.best_metric, self.best_step, self.evals_without_improvement = metric, self.step, 0
        else:
            self.evals_without_improvement += 1
        return improved

    def should_stop(self, patience: int | None) -> bool:
        return patience is not None and self.evals_without_improvement >= patience


class LossWindow:
    """Loss terms summed on the device between two log lines (no host synchronisation per step).

    The sums continue from `state.window_sums` (a resumed run's), and `save` puts them back there before a
    checkpoint, so the row logged after a resume is the one an uninterrupted run logs.
    """

    def __init__(self, state: TrainState):
        self.state = state
        self.sums: dict[str, torch.Tensor] = {}
        self.images = 0
        self.clips = 0
        self.start = time.perf_counter()

    @property
    def count(self) -> int:
        return self.state.window_count

    def add(self, losses: dict[str, torch.Tensor] | None, images: int, clips: int = 0) -> None:
        """Count a micro-batch: its loss terms (None for a skipped one), its images (video: frames) and clips."""
        self.images += images
        self.clips += clips
        if losses is None:
            return
        self.state.window_count += 1
        for name, value in losses.items():  # in float64, as Python would add the floats, in the same order
            value = value.to(torch.float64)
            if name not in self.sums:
                self.sums[name] = torch.tensor(self.state.window_sums.get(name, 0.0), dtype=torch.float64,
                                               device=value.device)
            self.sums[name] = self.sums[name] + value

    def save(self) -> None:
        """Copy the sums into the train state (one host synchronisation), for a checkpoint."""
        self.state.window_sums.update({name: float(total) for name, total in self.sums.items()})

    def flush(self) -> dict[str, float]:
        """The mean of each term and the images (video: frames, and clips) per second since the last flush; starts a
        new window."""
        self.save()
        # The total as `loss`, each term as `<term>_loss` (a validation row's `dice` is the metric).
        row = {name if name == "loss" else f"{name}_loss": total / self.count
               for name, total in self.state.window_sums.items()}
        elapsed = time.perf_counter() - self.start
        row["images_per_s"] = self.images / elapsed
        if self.clips:
            row["clips_per_s"] = self.clips / elapsed
        self.state.window_sums, self.state.window_count = {}, 0
        self.sums, self.images, self.clips, self.start = {}, 0, 0, time.perf_counter()
        return row


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint folder in `checkpoints_dir` at the highest training step, or None."""
    complete = [path for path in checkpoints_dir.glob("checkpoint_*") if (path / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda path: int((path / COMPLETE_MARKER).read_text() or -1), default=None)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
