"""transformers' Hub kernels stay off: nothing sam2-peft loads or builds fetches code from the Hub unless asked."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers import PreTrainedModel

from sam2_peft.cli import main
from sam2_peft.models import ModelLoadError, load_sam2

SAMPLE_DATA = str(Path(__file__).resolve().parents[1] / "examples" / "data")


@pytest.fixture
def kernels_forbidden(monkeypatch):
    """Make switching Hub kernels on raise, as it does on CUDA without the Hub; count every switch."""
    calls = []
    original = PreTrainedModel.set_use_kernels

    def guarded(self, use_kernels, *args, **kwargs):
        calls.append(bool(use_kernels))
        if use_kernels:
            raise RuntimeError("Hub kernels were switched on behind the user's back")
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", guarded)
    return calls


def test_train_eval_merge_and_predict_never_switch_kernels_on(kernels_forbidden, tmp_path):
    # A local Hugging Face folder goes through `from_pretrained`, which turns kernels on by default.
    load_sam2("tiny-random").save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    main(["train", "--model", base, "--data", SAMPLE_DATA, "--strategy", "lora", "--max_steps", "1",
          "--batch_size", "1", "--eval_steps", "1", "--max_objects_per_image", "1", "--output_dir",
          str(tmp_path / "run")])  # fmt: skip
    adapter = str(tmp_path / "run" / "final")
    main(["eval", "--model", base, "--adapter", adapter, "--data", SAMPLE_DATA, "--split", "val", "--no_baseline"])
    main(["merge", "--model", base, "--adapter", adapter, "--output_dir", str(tmp_path / "merged")])
    load_sam2(str(tmp_path / "merged"))
    image = tmp_path / "image.png"
    PIL.Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    main(["predict", "--model", base, "--adapter", adapter, "--image", str(image), "--box", "4,4,40,40",
          "--output", str(tmp_path / "mask.png")])  # fmt: skip
    assert (tmp_path / "mask.png").is_file()
    # from_pretrained asked at every load, and was told no each time.
    assert kernels_forbidden and not any(kernels_forbidden)


def test_hub_kernels_opt_in_switches_them_on(kernels_forbidden, tmp_path, monkeypatch):
    load_sam2("tiny-random").save_pretrained(tmp_path / "base")
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: False)
    for source in (str(tmp_path / "base"), "tiny-random"):
        kernels_forbidden.clear()
        with pytest.raises(RuntimeError, match="switched on"):
            load_sam2(source, hub_kernels=True)
        assert kernels_forbidden[-1] is True


def test_video_loads_never_switch_kernels_on_unless_asked(kernels_forbidden, tmp_path, monkeypatch):
    load_sam2("tiny-random-video", video=True).save_pretrained(tmp_path / "video")
    video = load_sam2(tmp_path / "video", video=True)  # through Sam2VideoModel.from_pretrained
    assert type(video).__name__ == "Sam2VideoModel" and not video.use_kernels
    assert kernels_forbidden and not any(kernels_forbidden)
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: False)
    with pytest.raises(RuntimeError, match="switched on"):
        load_sam2(tmp_path / "video", video=True, hub_kernels=True)
    assert kernels_forbidden[-1] is True


def test_hub_kernels_offline_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: True)
    with pytest.raises(ModelLoadError, match=r"`--hub_kernels`.*HF_HUB_OFFLINE is set\. Drop `--hub_kernels`"):
        load_sam2("tiny-random", hub_kernels=True)
