import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Sam2Model

from sam2_peft.models import ModelLoadError, build_image_processor, load_sam2, model_fingerprint


def test_tiny_random_is_deterministic_and_small():
    first, second = load_sam2("tiny-random"), load_sam2("tiny-random")
    num_params = sum(p.numel() for p in first.parameters())
    assert 1_000_000 <= num_params <= 2_000_000
    assert first.config.prompt_encoder_config.image_size == 256
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not first.training


def test_tiny_random_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_sam2("tiny-random")
    assert torch.equal(torch.rand(3), expected)


def test_local_folder_round_trip(tmp_path):
    model = load_sam2("tiny-random")
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_sam2(tmp_path / "tiny", dtype=torch.bfloat16)
    assert isinstance(loaded, Sam2Model)
    assert loaded.dtype == torch.bfloat16
    assert model_fingerprint(load_sam2(tmp_path / "tiny")) == model_fingerprint(model)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_sam2(tmp_path)


def test_fingerprint_changes_with_one_weight():
    model = load_sam2("tiny-random")
    before = model_fingerprint(model)
    assert before.startswith("sam2-") and len(before) == 21
    with torch.no_grad():
        model.mask_decoder.iou_token.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_image_processor_matches_model_size():
    processor = build_image_processor(load_sam2("tiny-random"))
    assert processor.size.height == processor.size.width == 256


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_offline_without_cache_gives_one_clear_error(tmp_path):
    result = _run_offline(
        "from sam2_peft import load_sam2; load_sam2('facebook/sam2.1-hiera-tiny')", tmp_path / "empty-cache"
    )
    assert result.returncode != 0
    message = result.stderr.splitlines()[-1]
    assert "ModelLoadError" in message
    for way_out in ("local model folder", "HF_HUB_OFFLINE=1", "tiny-random", "offline mode"):
        assert way_out in message


def test_hub_id_loads_offline_from_a_prefilled_cache(tmp_path):
    # The cache layout huggingface_hub reads: refs/<branch> names a commit, snapshots/<commit>/ holds the files.
    repo = tmp_path / "cache" / "models--facebook--sam2.1-hiera-tiny"
    commit = "0" * 40
    load_sam2("tiny-random").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import json; from sam2_peft import load_sam2, model_fingerprint;"
        "m = load_sam2('facebook/sam2.1-hiera-tiny');"
        "print(json.dumps([m.config._name_or_path, model_fingerprint(m)]))"
    )
    result = _run_offline(code, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    name, fingerprint = json.loads(result.stdout.splitlines()[-1])
    assert name == "facebook/sam2.1-hiera-tiny"
    assert fingerprint == model_fingerprint(load_sam2("tiny-random"))
