import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import sam2_peft.data.config as data_config
import sam2_peft.finetune as finetune_module
import sam2_peft.tasks as tasks_module
from sam2_peft.config import TrainConfig
from sam2_peft.finetune import finetune
from sam2_peft.models import load_sam2
from sam2_peft.strategies import apply_strategy
from sam2_peft.tasks import TASKS, UNCACHED_UNDER_FSDP
from sam2_peft.training import COMPLETE_MARKER, latest_checkpoint

from train_helpers import SAMPLE_DATA, final_tensors, tiny_config


def test_writes_the_fixed_outputs(tmp_path):
    metrics = finetune(tiny_config(tmp_path, strategy="decoder", checkpoint_steps=2))
    assert (tmp_path / "final" / "trained_tensors.safetensors").is_file()
    assert json.loads((tmp_path / "final" / "sam2_peft.json").read_text())["strategy"] == "decoder"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["steps"] == metrics["steps"] == 4
    for key in ("baseline", "last", "best"):
        assert set(on_disk[key]) >= {"dice", "iou", "precision", "recall"}
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    # Every loss term is logged, unweighted; with the default weights they add up to the total.
    rows = [row for row in json.loads((tmp_path / "history.json").read_text())["history"] if "loss" in row]
    assert rows
    for row in rows:
        weighted = 20 * row["focal_loss"] + row["dice_loss"] + row["iou_loss"] + row["object_score_loss"]
        assert weighted == pytest.approx(row["loss"], rel=1e-6) and row["dice_loss"] > 0
    assert (tmp_path / "config.yaml").is_file()
    assert latest_checkpoint(tmp_path / "checkpoints") is not None
    # The decoder strategy saves exactly the mask decoder's tensors.
    assert all(name.startswith("mask_decoder.") for name in final_tensors(tmp_path))


def test_loss_falls_on_an_overfitting_run(tmp_path):
    # Regression threshold from: 200 steps, 2 images, box prompts, lr 1e-3 (loss 4.7 -> 0.3, dice 0.01 -> 0.6).
    cfg = tiny_config(
        tmp_path, strategy="decoder", max_steps=200, eval_steps=200, logging_steps=10, learning_rate=1e-3,
        augment=False, box_probability=1.0, max_objects_per_image=4, checkpoint_steps=1000, warmup_ratio=0.0,
    )
    first_two = data_config.load_source(cfg.data)
    first_two["train"] = first_two["val"] = first_two["train"].select(range(2))
    original = data_config.load_source
    data_config.load_source = lambda *args, **kwargs: first_two
    try:
        metrics = finetune(cfg)
    finally:
        data_config.load_source = original
    losses = [row["loss"] for row in json.loads((tmp_path / "history.json").read_text())["history"] if "loss" in row]
    print(losses[0], losses[-1], metrics["baseline"]["dice"], metrics["last"]["dice"])
    assert losses[-1] < 0.25 * losses[0]
    assert metrics["last"]["dice"] > 0.5 > metrics["baseline"]["dice"]


def test_early_stopping_restores_the_best_weights(tmp_path, monkeypatch):
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.1])  # baseline, then steps 1, 2, 3: the best is step 1

    def fake_validate(*args, **kwargs):
        value = next(scripted)
        return {"dice": value, "iou": value, "precision": value, "recall": value, "num_objects": 1}

    monkeypatch.setattr(tasks_module, "validate", fake_validate)
    cfg = tiny_config(tmp_path, strategy="decoder", max_steps=10, eval_steps=1, early_stopping_patience=2,
                      learning_rate=1e-3, checkpoint_steps=1)
    metrics = finetune(cfg)
    assert metrics["steps"] == 3 and metrics["best_step"] == 1
    assert metrics["best"]["dice"] == 0.5 and metrics["last"]["dice"] == 0.2
    prefix = "segmenter.model."  # the training module's names for the Sam2Model's
    best = {k.removeprefix(prefix): v for k, v in load_file(tmp_path / "best" / "trainable.safetensors").items()}
    final = final_tensors(tmp_path)
    assert best.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, best[name]), name
    last = load_file(latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors")
    changed = [name for name in final if not torch.equal(final[name], last[prefix + name])]
    assert changed, "the final weights equal the last step's: the best ones were not restored"


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    real = tasks_module.compute_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return {**losses, "loss": losses["loss"] * math.nan} if calls["n"] == 2 else losses

    monkeypatch.setattr(tasks_module, "compute_loss", sometimes_nan)
    metrics = finetune(tiny_config(tmp_path / "one", strategy="decoder"))
    assert metrics["nonfinite_steps"] == 1 and metrics["steps"] == 4

    monkeypatch.setattr(tasks_module, "compute_loss", lambda *a, **k: {"loss": torch.tensor(math.inf, requires_grad=True)})
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row \\(--max_nonfinite_steps 3\\)"):
        finetune(tiny_config(tmp_path / "all", strategy="decoder", max_nonfinite_steps=3))


def test_resume_needs_a_complete_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        finetune(tiny_config(tmp_path, resume_from_checkpoint="latest"))
    assert not (tmp_path / "checkpoints" / "checkpoint_0" / COMPLETE_MARKER).exists()


def test_bf16_autocast_and_tensorboard_logging(tmp_path):
    metrics = finetune(tiny_config(tmp_path, strategy="lora", mixed_precision="bf16", report_to="tensorboard"))
    assert metrics["steps"] == 4 and math.isfinite(metrics["last"]["dice"])
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss", "lr", "images_per_s", "peak_memory_mb", "val/dice"} <= set(tags)


@pytest.mark.parametrize("flag, expected", [(None, "bf16"), ("no", "no")])
def test_mixed_precision_follows_the_accelerate_config_unless_given(tmp_path, monkeypatch, flag, expected):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file` exports
    finetune(tiny_config(tmp_path, strategy="decoder", mixed_precision=flag, max_steps=1, eval_steps=1))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["mixed_precision"] == expected


def test_gradient_checkpointing_flags_reach_the_model(tmp_path, monkeypatch, capsys):
    calls = []
    enable = finetune_module.enable_gradient_checkpointing
    monkeypatch.setattr(finetune_module, "enable_gradient_checkpointing",
                        lambda model, **options: calls.append(options) or enable(model, **options))
    cfg = tiny_config(tmp_path, gradient_checkpointing=True, checkpoint_strips=2, objects_per_checkpoint=3,
                      max_steps=1, eval_steps=1)
    assert finetune(cfg)["steps"] == 1
    assert calls == [{"strips": 2, "objects_per_checkpoint": 3, "backend": "auto"}]
    assert "the mask decoder (3 object(s) per checkpoint)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="`--objects_per_checkpoint` must be at least 1, got 0"):
        tiny_config(tmp_path, objects_per_checkpoint=0)


def test_feature_cache_encodes_each_view_once(tmp_path, monkeypatch):
    from sam2_peft.caching import FeatureCache

    encoded = []
    compute = FeatureCache._compute
    monkeypatch.setattr(FeatureCache, "_compute", lambda self, seg, pixels: encoded.append(len(pixels)) or compute(self, seg, pixels))
    four = data_config.load_source(SAMPLE_DATA)
    four["train"] = four["train"].select(range(4))
    monkeypatch.setattr(data_config, "load_source", lambda *args, **kwargs: four)
    cfg = tiny_config(tmp_path, strategy="decoder", augment=True, cache_views=2, max_steps=None, num_epochs=4,
                      eval_steps=8, checkpoint_steps=100)
    metrics = finetune(cfg)
    assert metrics["steps"] == 8
    # 4 training images x 2 augmented views, then cache hits; the 8 validation images once.
    assert sum(encoded) == 4 * 2 + 8


def test_resuming_an_older_checkpoint_with_later_ones_is_refused(tmp_path):
    cfg = dict(strategy="decoder", max_steps=6, eval_steps=6, checkpoint_steps=2, checkpoint_total_limit=10)
    finetune(tiny_config(tmp_path, **cfg))
    oldest = tmp_path / "checkpoints" / "checkpoint_0"
    assert (oldest / COMPLETE_MARKER).read_text() == "2"
    with pytest.raises(FileExistsError, match="later checkpoints"):
        finetune(tiny_config(tmp_path, resume_from_checkpoint=str(oldest), **cfg))


def test_resuming_a_finished_run_trains_nothing_and_rewrites_the_same_results(tmp_path, monkeypatch):
    first = finetune(tiny_config(tmp_path, strategy="decoder", eval_steps=2, checkpoint_steps=3))
    # Checkpoints at step 3 and at the last step (4), which is not a multiple of --checkpoint_steps.
    assert int((latest_checkpoint(tmp_path / "checkpoints") / COMPLETE_MARKER).read_text()) == 4
    weights = final_tensors(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tasks_module, "compute_loss", no_training)
    again = finetune(tiny_config(tmp_path, strategy="decoder", eval_steps=2, checkpoint_steps=3,
                                 resume_from_checkpoint="latest"))
    assert again == first
    resumed = final_tensors(tmp_path)
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)

    (tmp_path / "best" / "trainable.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="best weights .step [0-9]+., which the final model restores"):
        finetune(tiny_config(tmp_path, strategy="decoder", eval_steps=2, checkpoint_steps=3,
                             resume_from_checkpoint="latest"))


def test_resuming_an_early_stopped_run_trains_nothing(tmp_path, monkeypatch):
    # With a zero learning rate the metric never improves after the first evaluation: patience 1 stops at step 2.
    cfg = dict(strategy="decoder", learning_rate=0.0, eval_steps=1, early_stopping_patience=1, checkpoint_steps=100)
    first = finetune(tiny_config(tmp_path, **cfg))
    assert first["steps"] == 2
    monkeypatch.setattr(tasks_module, "compute_loss", lambda *a, **k: pytest.fail("an early-stopped run resumed"))
    assert finetune(tiny_config(tmp_path, resume_from_checkpoint="latest", **cfg)) == first


def test_resume_with_gradient_accumulation_ends_like_an_uninterrupted_run(tmp_path):
    cfg = dict(strategy="lora", gradient_accumulation_steps=2, batch_size=1, checkpoint_steps=2, lora_dropout=0.1,
               learning_rate=1e-3)
    finetune(tiny_config(tmp_path / "whole", **cfg))
    finetune(tiny_config(tmp_path / "cut", **cfg))
    # Back to the step-2 checkpoint, as if the run had died there: its last checkpoint and outputs go.
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint_1")
    shutil.rmtree(tmp_path / "cut" / "final")
    assert int((latest_checkpoint(tmp_path / "cut" / "checkpoints") / COMPLETE_MARKER).read_text()) == 2
    finetune(tiny_config(tmp_path / "cut", resume_from_checkpoint="latest", **cfg))
    whole, resumed = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), f"{name} differs after resuming mid-accumulation run"


def test_loader_options_feed_a_gpu_and_leave_the_cpu_cores_to_training(monkeypatch):
    monkeypatch.setattr(finetune_module.os, "cpu_count", lambda: 16)
    assert finetune_module.loader_options(None, torch.device("cpu"), 1) == {"num_workers": 0, "pin_memory": False}
    assert finetune_module.loader_options(None, torch.device("cuda"), 4) == {
        "num_workers": 4, "pin_memory": True, "prefetch_factor": 4, "persistent_workers": False}
    assert finetune_module.loader_options(None, torch.device("cuda"), 1)["num_workers"] == 8
    assert finetune_module.loader_options(0, torch.device("cuda"), 1) == {"num_workers": 0, "pin_memory": True}


@pytest.mark.parametrize("task", ["image", "video"])
def test_no_feature_cache_under_fsdp(task, tmp_path):
    """A cache runs the frozen encoder outside the module's forward, where FSDP would hold only a shard of it."""
    data = SAMPLE_DATA if task == "image" else str(Path(__file__).parents[2] / "examples" / "data_video")
    cfg = TrainConfig(model="tiny-random-video", data=data, task=task, strategy="decoder", output_dir=str(tmp_path))
    model = apply_strategy(load_sam2("tiny-random-video", video=task == "video"), "decoder")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    parts = TASKS[task].build(cfg, model, TASKS[task].load_splits(cfg), "fingerprint", fsdp)
    assert parts.train_cache is None and parts.val_cache is None and parts.message == UNCACHED_UNDER_FSDP
