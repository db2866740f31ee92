"""`sam2-peft demo`: its numbers against the model run directly, its `segment` API through gradio_client, and the
page itself in headless Chromium (upload, two clicks for a box, a point, both overlays read back and seen in a
screenshot, the label-map download, messages for bad input).

Needs gradio, gradio_client, playwright (the Python package only: never `playwright install`) and Debian's
chromium (/usr/bin/chromium). Without them these tests are skipped with the reason; with `CI` set they fail.
The server starts once per module (per xdist worker that runs some of these tests), the browser once.
"""

import importlib
import io
import os
import re
import shutil
import socket
import urllib.request

import nibabel
import numpy as np
import PIL.Image
import pytest
import tifffile
import torch
from peft import PeftModel

from sam2_peft.data.config import DataConfig
from sam2_peft.data.intensity import IntensityConfig, normalize_intensity
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.demo import DemoInputError, DemoPredictor, Prompt
from sam2_peft.demo.launch import build_parser, main, parse_adapters, reach_note, serve
from sam2_peft.demo.predictor import ADAPTER_COLOUR, BASE_COLOUR
from sam2_peft.hub import DomainAdapters, load_adapter, save_adapter
from sam2_peft.models import build_image_processor, load_sam2
from sam2_peft.prediction import segment_image
from sam2_peft.strategies import apply_strategy

BOX = (20, 20, 80, 70)
WINDOW = "1250,1000"  # level, width: the 16-bit image's 750..1750 -> [0, 1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the demo tests, but {reason}")
    pytest.skip(reason)


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        _missing(f"{module} is not installed ({err}); install it with `pip install 'sam2-peft[demo]' playwright`.")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two LoRA adapters with an effect (one records a CT window), an 8-bit, a 16-bit and a NIfTI image."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    lora = apply_strategy(load_sam2("tiny-random"), "lora", init_lora_weights=False)
    save_adapter(lora, folder / "lora", strategy="lora")  # no preprocessing record: the defaults
    save_adapter(lora, folder / "windowed", strategy="lora", data=DataConfig(ct_window=WINDOW))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :200]
    ellipse = (xx - 100) ** 2 / 50**2 + (yy - 80) ** 2 / 35**2 < 1
    gray = (60 + 120 * ellipse + rng.integers(0, 40, (160, 200))).astype(np.uint8)
    PIL.Image.fromarray(gray).save(folder / "gray.png")
    deep = (900 + 500 * ellipse + rng.integers(0, 100, (160, 200))).astype(np.uint16)
    deep[:2, :2] = 60000  # hot pixels: a percentile clip ignores them, the window does not care
    PIL.Image.fromarray(deep).save(folder / "deep.png")
    volume = np.stack([np.roll(gray, 15 * k, axis=1).astype(np.int16) * 8 for k in range(5)], axis=-1)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / "volume.nii.gz")
    tifffile.imwrite(folder / "slice3.tif", volume[:, :, 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


@pytest.fixture(scope="module")
def predictor(files):
    return DemoPredictor.load("tiny-random", [("lora", str(files / "lora")), ("windowed", str(files / "windowed"))])


@pytest.fixture(scope="module")
def reference(files):
    """Labels maps from `segment_image` on a plain base model and on each adapter alone."""
    base = load_sam2("tiny-random")
    domains = DomainAdapters(load_sam2("tiny-random")).add("lora", files / "lora").add("windowed", files / "windowed")

    def labels(image, box, domain, data=None):
        return (segment_image(base, image, [box], data=data) > 0,
                segment_image(domains, image, [box], domain=domain) > 0)
    return labels


@pytest.fixture(scope="module")
def server(predictor):
    _need("gradio")
    _need("gradio_client")
    from sam2_peft.demo.app import build_app

    app = build_app(predictor)
    port = _free_port()
    serve(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    with pytest.MonkeyPatch.context() as env:  # the client reads it, not only its argument, before telemetry
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        return Client(server, verbose=False, analytics_enabled=False)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _check_overlay(path, display, mask, colour, box):
    """Inside `mask` the pixels are half image, half `colour`; outside they are the image (box lines aside)."""
    drawn = np.asarray(PIL.Image.open(path).convert("RGB")).astype(int)
    assert drawn.shape == display.shape
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    on_box = ((np.abs(xx - x1) <= 2) | (np.abs(xx - x2) <= 2) | (np.abs(yy - y1) <= 2) | (np.abs(yy - y2) <= 2))
    interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    inside, outside = interior & ~on_box, ~mask & ~on_box
    assert inside.sum() > 100 and outside.sum() > 100
    blended = (display.astype(float) + np.asarray(colour)) / 2
    assert np.abs(drawn[inside] - blended[inside]).max() <= 1
    np.testing.assert_array_equal(drawn[outside], display[outside])


def test_api_numbers_and_overlays_match_the_models(client, files, reference):
    from gradio_client import handle_file

    base_png, tuned_png, numbers = client.predict(handle_file(str(files / "gray.png")), "20,20,80,70", "lora",
                                                  api_name="/segment")
    base, tuned = reference(files / "gray.png", BOX, "lora")
    assert numbers["base_area"] == base.sum() and numbers["adapter_area"] == tuned.sum()
    assert numbers["iou_between"] == pytest.approx(_iou(base, tuned))
    assert numbers["iou_between"] < 0.95  # the adapter changes the mask, so a swapped model would show
    display = np.repeat(np.asarray(PIL.Image.open(files / "gray.png"))[:, :, None], 3, axis=2)
    _check_overlay(base_png, display, base, BASE_COLOUR, BOX)
    _check_overlay(tuned_png, display, tuned, ADAPTER_COLOUR, BOX)


def test_api_16_bit_image_gets_the_adapters_recorded_window(client, files, reference, predictor):
    from gradio_client import handle_file

    base_png, _, numbers = client.predict(handle_file(str(files / "deep.png")), "20,20,80,70", "windowed",
                                          api_name="/segment")
    # segment_image resolves the adapter's record itself; the plain base gets the same window by flag.
    base, tuned = reference(files / "deep.png", BOX, "windowed", DataConfig(ct_window=WINDOW))
    assert (numbers["base_area"], numbers["adapter_area"]) == (base.sum(), tuned.sum())
    assert numbers["iou_between"] == pytest.approx(_iou(base, tuned))
    raw = np.asarray(PIL.Image.open(files / "deep.png"))[:, :, None]
    windowed = np.round(normalize_intensity(raw, IntensityConfig(mode="window", window=(1250.0, 1000.0))) * 255)
    display = windowed.transpose(1, 2, 0).astype(np.uint8)
    default = np.round(normalize_intensity(raw) * 255).transpose(1, 2, 0)
    assert np.abs(display.astype(float) - default).mean() > 20  # the window is visibly not the default
    _check_overlay(base_png, display, base, BASE_COLOUR, BOX)
    assert "CT window" in predictor.notes["windowed"] and "recorded in" in predictor.notes["windowed"]


def test_api_nifti_slice(client, files, reference):
    from gradio_client import handle_file

    volume = handle_file(str(files / "volume.nii.gz"))
    _, _, numbers = client.predict(volume, "20,20,80,70", "lora", 3, api_name="/segment")
    base, tuned = reference(files / "slice3.tif", BOX, "lora")
    assert (numbers["base_area"], numbers["adapter_area"]) == (base.sum(), tuned.sum())
    _, _, middle = client.predict(volume, "20,20,80,70", "lora", api_name="/segment")  # slice 2 of 0..4
    assert middle != numbers


@pytest.mark.parametrize(("image", "box", "slice_index", "message"), [
    ("gray.png", "20,20,280,70", None, r"Box 20,20,280,70 is not inside the 200x160 image"),
    ("gray.png", "20,20,80", None, r"expected four comma-separated numbers x1,y1,x2,y2"),
    ("gray.png", "", None, r"No box: give `box`"),
    ("empty.png", "20,20,80,70", None, r"empty.png is empty \(0 bytes\)"),
    ("broken.png", "20,20,80,70", None, r"broken.png: cannot be read as an image"),
    ("volume.nii.gz", "20,20,80,70", 7, r"Slice index 7 is outside volume.nii.gz's 5 slices"),
])
def test_api_refuses_bad_input_with_a_message(client, files, image, box, slice_index, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(files / image)), box, "lora", slice_index, api_name="/segment")


def _transformers_point_reference(model, pixels, points, labels):
    """Mask and predicted IoU from plain `Sam2Model.forward` + `Sam2ImageProcessor.post_process_masks`."""
    height, width = pixels.shape[1:]
    size = Preprocessor.from_model(model).image_size
    scaled = torch.tensor(points, dtype=torch.float32) * torch.tensor([size / width, size / height])
    pixel_values = Preprocessor.from_model(model).pixel_values(torch.from_numpy(pixels))[None]
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_points=scaled[None, None], input_labels=torch.tensor([[labels]]),
                    multimask_output=len(points) == 1)
    best = int(out.iou_scores[0, 0].argmax())
    processor = build_image_processor(model.get_base_model() if isinstance(model, PeftModel) else model)
    masks = processor.post_process_masks(out.pred_masks[:, :, best : best + 1], [[height, width]])
    return masks[0][0, 0].numpy(), float(out.iou_scores[0, 0, best])


@pytest.mark.parametrize(("points", "labels"), [([(100, 80)], [1]), ([(100, 80), (30, 30)], [1, 0])])
def test_point_prompts_match_plain_transformers(predictor, files, points, labels):
    image = predictor.read(files / "gray.png", domain="lora")
    result = predictor.compare(image, Prompt(points=points, labels=labels), domain="lora")
    tuned = PeftModel.from_pretrained(load_sam2("tiny-random"), str(files / "lora")).eval()
    for model, mask, predicted in ((load_sam2("tiny-random"), result.base_mask, result.base_predicted_iou),
                                   (tuned, result.adapter_mask, result.adapter_predicted_iou)):
        expected_mask, expected_iou = _transformers_point_reference(model, image.pixels, points, labels)
        np.testing.assert_array_equal(mask, expected_mask)
        assert predicted == pytest.approx(expected_iou, abs=1e-5)
    assert not np.array_equal(result.base_mask, result.adapter_mask)


def test_trained_tensors_adapter_against_its_own_base(tmp_path, files):
    torch.manual_seed(1)
    model = apply_strategy(load_sam2("tiny-random"), "decoder")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    save_adapter(model, tmp_path / "decoder", strategy="decoder")
    # Beside a PEFT domain: that one's base is its disabled adapter, this one's its own base copy.
    predictor = DemoPredictor.load("tiny-random", [("lora", str(files / "lora")), ("dec", str(tmp_path / "decoder"))])
    result = predictor.compare(predictor.read(files / "gray.png", domain="dec"), Prompt(box=BOX), domain="dec")
    base = segment_image(load_sam2("tiny-random"), files / "gray.png", [BOX])
    tuned = segment_image(load_adapter(load_sam2("tiny-random"), tmp_path / "decoder"), files / "gray.png", [BOX])
    np.testing.assert_array_equal(result.base_mask, base > 0)
    np.testing.assert_array_equal(result.adapter_mask, tuned > 0)
    assert not np.array_equal(base, tuned)


def test_predictor_refuses_bad_prompts_and_names(predictor, files):
    image = predictor.read(files / "gray.png", domain="lora")
    with pytest.raises(DemoInputError, match="No prompt"):
        predictor.compare(image, Prompt(), domain="lora")
    with pytest.raises(DemoInputError, match=r"Point \(250, 10\) is outside the 200x160 image"):
        predictor.compare(image, Prompt(points=[(250, 10)], labels=[1]), domain="lora")
    with pytest.raises(DemoInputError, match=r"Unknown adapter 'ct'; the demo has \['lora', 'windowed'\]"):
        predictor.read(files / "gray.png", domain="ct")
    with pytest.raises(DemoInputError, match=r"--adapter c\.t=.*NAME may hold letters"):
        DemoPredictor.load("tiny-random", [("c.t", str(files / "lora"))])


def test_intensity_flags_override_the_adapters_record(files):
    with pytest.warns(UserWarning, match="using the flags"):
        predictor = DemoPredictor.load("tiny-random", [("windowed", str(files / "windowed"))],
                                       DataConfig(intensity="minmax"))
    assert predictor.notes["windowed"] == "intensity minmax (from the command-line flags)"
    raw = np.asarray(PIL.Image.open(files / "deep.png"))[:, :, None]
    image = predictor.read(files / "deep.png", domain="windowed")
    np.testing.assert_array_equal(image.pixels, normalize_intensity(raw, IntensityConfig(mode="minmax")))
    assert "uint16 200x160, 1 channel(s), values 900..60000" in image.description


def test_command_line_errors_name_the_flag(capsys, files):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parse_adapters(["a", "b=x"], parser)
    assert "--adapter a: with several adapters, name each one" in capsys.readouterr().err
    assert parse_adapters([str(files / "lora")], parser) == [("default", str(files / "lora"))]
    _need("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "tiny-random", "--adapter", str(files / "lora"), "--port", str(port)])
    assert exit_info.value.code == 2
    assert f"--port {port} is already in use on 127.0.0.1" in capsys.readouterr().err


def test_reach_note_says_who_can_use_the_page():
    assert reach_note("0.0.0.0", 7861) == ("--host 0.0.0.0: anyone who can reach this machine on port 7861 can use "
                                           "the demo (upload images, run the models); it has no login.")
    assert "only this machine can reach it" in reach_note("127.0.0.1", 7860)
    assert "only this machine can reach it" in reach_note("::1", 7860)


@pytest.fixture(scope="module")
def page(server):
    playwright_api = _need("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM}; install it with `apt-get install chromium`.")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        page.goto(server)
        yield page
        browser.close()


def _upload(page, path):
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.set_input_files("#upload input[type=file]", str(path))


def _click_pixel(page, x, y):
    """Click pixel (x, y) of the prompt image, wherever and however large the page shows it; wait for the redraw."""
    image = page.locator("#prompt-image img")
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=image.element_handle())
    box = image.bounding_box()
    source, natural_width, natural_height = image.evaluate("e => [e.src, e.naturalWidth, e.naturalHeight]")
    scale = min(box["width"] / natural_width, box["height"] / natural_height, 1)
    left = box["x"] + (box["width"] - natural_width * scale) / 2
    top = box["y"] + (box["height"] - natural_height * scale) / 2
    page.mouse.click(left + (x + 0.5) * scale, top + (y + 0.5) * scale)
    # Every click redraws the prompts; as a person would, click again only once it shows.
    page.wait_for_function("([s]) => { const e = document.querySelector('#prompt-image img');"
                           " return e && e.src !== s && e.complete; }", arg=[source])


def _fetch(page, selector, attribute):
    with urllib.request.urlopen(page.locator(selector).get_attribute(attribute)) as response:
        return response.read()


def _info(page, pattern):
    """Wait for the Messages box to match `pattern`, then return its text."""
    box = page.locator("#info textarea")
    page.wait_for_function("([e, p]) => new RegExp(p).test(e.value)", arg=[box.element_handle(), pattern])
    return box.input_value()


def _hue_counts(screenshot, box):
    """Pixels of blue and of orange hue inside `box` (a Playwright bounding box) of a page screenshot."""
    region = screenshot[int(box["y"]) : int(box["y"] + box["height"]), int(box["x"]) : int(box["x"] + box["width"])]
    hsv = np.asarray(PIL.Image.fromarray(region).convert("HSV")).astype(int)
    hue, saturated = hsv[..., 0] * 360 / 255, hsv[..., 1] > 80
    return int((saturated & (abs(hue - 210) < 20)).sum()), int((saturated & (abs(hue - 33) < 12)).sum())


def test_page_box_by_two_clicks_a_point_and_bad_input(page, files, reference, predictor):
    _upload(page, files / "gray.png")
    page.locator("#prompt-image img").wait_for()
    _click_pixel(page, 20, 20)
    _click_pixel(page, 80, 70)
    summary = _info(page, "IoU between them")
    assert page.locator("#box textarea").input_value() == "20,20,80,70"
    base, tuned = reference(files / "gray.png", BOX, "lora")
    assert f"base: {base.sum()} px" in summary and f"fine-tuned (lora): {tuned.sum()} px" in summary
    assert f"IoU between them {_iou(base, tuned):.4f}" in summary
    display = np.repeat(np.asarray(PIL.Image.open(files / "gray.png"))[:, :, None], 3, axis=2)
    _check_overlay(io.BytesIO(_fetch(page, "#base-overlay img", "src")), display, base, BASE_COLOUR, BOX)
    _check_overlay(io.BytesIO(_fetch(page, "#adapter-overlay img", "src")), display, tuned, ADAPTER_COLOUR, BOX)
    labels = np.asarray(PIL.Image.open(io.BytesIO(_fetch(page, "#label-map a", "href"))))
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, tuned.astype(np.uint16))

    screenshot = np.asarray(PIL.Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    base_blue, base_orange = _hue_counts(screenshot, page.locator("#base-overlay img").bounding_box())
    tuned_blue, tuned_orange = _hue_counts(screenshot, page.locator("#adapter-overlay img").bounding_box())
    assert base_blue > 0.3 * base.sum() and base_orange == 0
    assert tuned_orange > 0.3 * tuned.sum() and tuned_blue == 0

    page.locator("#clear").click()
    page.wait_for_function("e => e.value === ''", arg=page.locator("#box textarea").element_handle())
    page.get_by_label("Positive point").check()
    _click_pixel(page, 100, 80)
    expected = predictor.compare(predictor.read(files / "gray.png", domain="lora"),
                                 Prompt(points=[(100, 80)], labels=[1]), domain="lora").numbers()
    assert expected["adapter_area"] != tuned.sum()  # else the wait below could pass on the box's result
    _info(page, re.escape(f"base: {expected['base_area']} px") + ".*" +
          re.escape(f"fine-tuned (lora): {expected['adapter_area']} px"))

    # A volume: the slice field appears at the middle slice; another slice is one entry away.
    _upload(page, files / "volume.nii.gz")
    _info(page, r"volume\.nii\.gz slice 2 of 0\.\.4 \(axis 2\): int16 200x160")
    assert page.locator("#slice input").input_value() == "2"
    page.locator("#slice input").fill("3")
    _info(page, r"volume\.nii\.gz slice 3 of 0\.\.4")

    # Bad input: messages on the page, no traceback, no stale overlays.
    _upload(page, files / "broken.png")
    assert "broken.png: cannot be read as an image" in _info(page, "cannot be read")
    _upload(page, files / "gray.png")
    _info(page, "gray.png: uint8 200x160")
    page.locator("#segment").click()
    assert _info(page, "No prompt").startswith("No prompt: draw a box")
    page.locator("#box textarea").fill("0,0,500,70")
    page.locator("#segment").click()
    assert re.search(r"Box 0,0,500,70 is not inside", _info(page, "not inside"))
    toasts = page.locator("[data-testid=toast-text]").all_inner_texts()  # gr.Warning pop-ups
    assert any(text.startswith("Box 0,0,500,70 is not inside the 200x160 image") for text in toasts)
    assert "Traceback" not in page.content()
    assert page.locator("#base-overlay img").count() == 0
