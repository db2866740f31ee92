"""The adapter carries its preprocessing: written by training, read by transformers, applied by eval and predict."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers import AutoImageProcessor, Sam2ImageProcessor

from sam2_peft.config import TrainConfig
from sam2_peft.data.config import DataConfig
from sam2_peft.evaluation import evaluate_model
from sam2_peft.export import merge_to_folder
from sam2_peft.finetune import finetune
from sam2_peft.hub import (
    DomainAdapters,
    PreprocessingError,
    adapter_preprocessing,
    load_adapter,
    read_preprocessing,
    resolve_data_config,
)
from sam2_peft.hub.files import PREPROCESSOR_CONFIG
from sam2_peft.models import load_sam2
from sam2_peft.prediction import segment_image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
# The bundled cells are 16-bit: `auto` clips them at the 0.5/99.5 percentiles, `minmax` does not clip.
TRAINED = dict(intensity="minmax")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step LoRA runs on one train and two val cells: one with `minmax` intensities, one with a CT window."""
    root = tmp_path_factory.mktemp("preprocessing")
    for split, count in (("train", 1), ("val", 2)):
        for image in sorted((EXAMPLES / split / "images").iterdir())[:count]:
            for kind in ("images", "masks"):
                (root / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy(EXAMPLES / split / kind / image.name, root / "data" / split / kind / image.name)
    common = dict(model="tiny-random", data=str(root / "data"), strategy="lora", max_steps=2, batch_size=1,
                  eval_steps=1, max_objects_per_image=2, learning_rate=1e-2)
    finetune(TrainConfig(**common, **TRAINED, output_dir=str(root / "minmax")))
    finetune(TrainConfig(**common, ct_window="100,50", output_dir=str(root / "window")))
    return root


def test_training_outputs_carry_a_processor_transformers_reads(runs):
    for folder in (runs / "minmax" / "final", runs / "minmax" / "best"):
        record = json.loads((folder / PREPROCESSOR_CONFIG).read_text())
        assert record["sam2_peft"] == {
            "channels": "gray-to-rgb,drop-alpha", "intensity": "minmax", "intensity_percentiles": "0.5,99.5",
            "ct_window": None, "mask_type": "instance", "num_classes": None,
        }  # fmt: skip
        processor = AutoImageProcessor.from_pretrained(folder)
        reference = Sam2ImageProcessor(size={"height": 256, "width": 256})
        assert isinstance(processor, Sam2ImageProcessor)
        assert (processor.size["height"], processor.size["width"]) == (256, 256)
        assert processor.image_mean == reference.image_mean and processor.image_std == reference.image_std
        assert processor.rescale_factor == reference.rescale_factor
    window = read_preprocessing(runs / "window" / "final")
    assert window.intensity_config().mode == "window" and window.intensity_config().window == (100.0, 50.0)


def test_eval_applies_the_adapters_preprocessing_unless_a_flag_disagrees(runs):
    adapter = runs / "minmax" / "final"
    options = dict(adapter=adapter, split="val", baseline=False, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # applying the record, or a flag that agrees with it, warns about nothing
        recorded = evaluate_model("tiny-random", str(runs / "data"), **options)
        agreeing = evaluate_model("tiny-random", DataConfig(data=str(runs / "data"), **TRAINED), **options)
    assert recorded["protocol"]["intensity"] == "minmax"
    assert recorded["fine_tuned"]["dice"] == agreeing["fine_tuned"]["dice"]
    with pytest.warns(UserWarning, match=r"intensity auto \(0\.5, 99\.5\) \(flags\) vs minmax \(adapter\)"):
        flagged = evaluate_model("tiny-random", DataConfig(data=str(runs / "data"), intensity="auto"), **options)
    assert flagged["protocol"]["intensity"] == "auto"
    # The adapter's predictions depend on the pixels, so the two settings must score differently.
    assert flagged["fine_tuned"]["dice"] != recorded["fine_tuned"]["dice"]


def test_an_adapter_without_a_record_uses_the_defaults_and_says_so(runs, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(runs / "minmax" / "final", old)
    (old / PREPROCESSOR_CONFIG).unlink()
    with caplog.at_level(logging.INFO, logger="sam2_peft"):
        model = load_adapter(load_sam2("tiny-random"), old)
    assert adapter_preprocessing(model) is None
    assert "has no preprocessor_config.json" in caplog.text
    assert resolve_data_config(DataConfig(), None, where="old").intensity == "auto"


def test_predict_uses_each_domains_own_preprocessing(runs, tmp_path):
    image = tmp_path / "scan.png"
    PIL.Image.fromarray((np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 65535).astype(np.uint16)).save(image)
    box = [(30.0, 40.0, 200.0, 220.0)]
    domains = DomainAdapters(load_sam2("tiny-random"))
    domains.add("cells", runs / "minmax" / "final").add("ct", runs / "window" / "final")
    assert domains.preprocessing("cells").data["intensity"] == "minmax"
    assert domains.preprocessing("ct").data["ct_window"] == "100,50"
    for name, folder, flags in (("cells", "minmax", TRAINED), ("ct", "window", {"ct_window": "100,50"})):
        alone = load_adapter(load_sam2("tiny-random"), runs / folder / "final")
        expected = segment_image(alone, image, box, data=DataConfig(**flags))
        assert np.array_equal(segment_image(domains, image, box, domain=name), expected)
    # Against the other domain's settings the masks differ, so the test sees which preprocessing ran.
    cells_as_ct = segment_image(load_adapter(load_sam2("tiny-random"), runs / "minmax" / "final"), image, box,
                                data=DataConfig(ct_window="100,50"))
    assert not np.array_equal(segment_image(domains, image, box, domain="cells"), cells_as_ct)


def test_merged_folders_carry_the_record(runs, tmp_path):
    model = load_adapter(load_sam2("tiny-random"), runs / "window" / "final")
    merge_to_folder(model, tmp_path / "merged")
    assert read_preprocessing(tmp_path / "merged").data["ct_window"] == "100,50"
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path / "merged"), Sam2ImageProcessor)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[:-5], r"preprocessor_config.json is not valid JSON"),
        (lambda text: text.replace("Sam2ImageProcessor", "CLIPImageProcessor"),
         r"key 'image_processor_type' is 'CLIPImageProcessor'.*another model family"),
        (lambda text: text.replace('"intensity": "minmax"', '"intensity": "loud"'),
         r"'sam2_peft' section holds an invalid value.*intensity mode='loud'"),
        (lambda text: text.replace('"channels"', '"colour"'), r"unknown key\(s\) \['sam2_peft.colour'\]"),
        (lambda text: text.replace('"height": 256', '"height": 512').replace('"width": 256', '"width": 512'),
         r"key 'size' is 512 px but the model's input is 256 px"),
        (lambda text: text.replace('"num_classes": null', '"num_classes": "three"'),
         r"key 'sam2_peft.num_classes' must be int or null"),
    ],
)  # fmt: skip
def test_a_bad_record_is_refused_naming_the_file_and_key(runs, tmp_path, edit, message):
    bad = tmp_path / "bad"
    shutil.copytree(runs / "minmax" / "final", bad)
    path = bad / PREPROCESSOR_CONFIG
    path.write_text(edit(path.read_text()))
    model = load_sam2("tiny-random")
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(PreprocessingError, match=message) as error:
        load_adapter(model, bad)
    assert str(path) in str(error.value)
    assert [name for name, _ in model.named_modules()] == names, "a refused record must not touch the model"
