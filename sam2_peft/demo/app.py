"""The Gradio page and its `segment` API endpoint over a `DemoPredictor`.

    app = build_app(DemoPredictor.load("tiny-random", [("ct", "runs/ct/final")]))
    app.launch(server_name="127.0.0.1", server_port=7860)

    from gradio_client import Client, handle_file          # the same prediction, from a script
    base, tuned, numbers = Client("http://127.0.0.1:7860/").predict(
        handle_file("scan.png"), "40,60,200,220", "ct", api_name="/segment")

Gradio draws no boxes on images, so the page takes clicks (`gr.Image.select`, which reports the clicked pixel of
the image as sent): in box mode two clicks are opposite corners; in point modes each click is a positive or
negative point. The box can also be typed. Bad input shows a warning and a message, never a traceback.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np

from sam2_peft.demo.predictor import (
    ADAPTER_COLOUR,
    BASE_COLOUR,
    Comparison,
    DemoInputError,
    DemoPredictor,
    LoadedImage,
    Prompt,
    draw_prompt,
    overlay,
    parse_box,
)
from sam2_peft.prediction import save_label_map
from sam2_peft.segmenter import NEGATIVE, POSITIVE

BOX_MODE, POSITIVE_MODE, NEGATIVE_MODE = "Box: two clicks, opposite corners", "Positive point", "Negative point"
FILE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".gz"]
NO_CLICKS = {"points": [], "labels": [], "corner": None}
_INSTRUCTIONS = (
    "Upload an image (8/16-bit PNG/TIFF/JPEG, or a NIfTI volume and a slice index), pick the domain adapter, then "
    "click on the image: two clicks draw a box, or switch to positive/negative points. The left image is shown as "
    "the adapter's preprocessing normalises it; both models see exactly these pixels. "
    "<span style='color:rgb{}'>Blue</span>: base model, <span style='color:rgb{}'>orange</span>: fine-tuned."
).format(BASE_COLOUR, ADAPTER_COLOUR)


def overlays(image: LoadedImage, result: Comparison, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """The base model's and the adapter's mask drawn on the image as the model sees it, with the prompt."""
    display = image.display()
    return (overlay(display, result.base_mask, BASE_COLOUR, prompt),
            overlay(display, result.adapter_mask, ADAPTER_COLOUR, prompt))


def build_app(predictor: DemoPredictor, *, nifti_axis: int = 2) -> gr.Blocks:
    """Build the page: upload, prompt by clicking, both models' overlays, numbers and the label-map download."""
    handlers = Handlers(predictor, nifti_axis=nifti_axis)
    with gr.Blocks(title="sam2-peft: base vs fine-tuned", analytics_enabled=False) as app:
        app.downloads = handlers.downloads  # lives as long as the app: the label maps the page offers are in it
        gr.Markdown(f"## Base model vs fine-tuned adapter\n{_INSTRUCTIONS}")
        page = _layout(predictor.names)
        _wire(page, handlers)
    return app


class Handlers:
    """The page's event handlers over one `DemoPredictor`: each takes component values and returns new ones.

    Args:
        predictor: the models to compare.
        nifti_axis: the axis NIfTI uploads are sliced along.
    """

    def __init__(self, predictor: DemoPredictor, *, nifti_axis: int = 2):
        self.predictor = predictor
        # Clicks re-run the prediction on the same upload: decode it once.
        self.read = functools.lru_cache(maxsize=4)(functools.partial(predictor.read, nifti_axis=nifti_axis))
        self.downloads = tempfile.TemporaryDirectory(prefix="sam2-peft-demo-")

    def load(self, path, slice_index, domain) -> LoadedImage:
        return self.read(path, domain=domain, slice_index=None if slice_index is None else int(slice_index))

    @staticmethod
    def prompt_of(box_text, clicks) -> Prompt:
        return Prompt(parse_box(box_text), [tuple(p) for p in clicks["points"]], list(clicks["labels"]))

    def drawn(self, path, slice_index, domain, box_text, clicks):
        image = self.load(path, slice_index, domain)
        return draw_prompt(image.display(), self.prompt_of(box_text, clicks), clicks["corner"]), image.description

    def show(self, path, slice_index, domain, box_text, clicks):
        """Redraw the prompt image; a warning and an empty image when the upload cannot be used."""
        if path is None:
            return None, ""
        try:
            return self.drawn(path, slice_index, domain, box_text, clicks)
        except DemoInputError as err:
            gr.Warning(str(err))
            return None, str(err)

    def new_slice(self, path, slice_index, domain):
        """Another slice (or upload): no prompts, no results, the image as the adapter sees it."""
        drawn, message = self.show(path, slice_index, domain, "", NO_CLICKS)
        return "", NO_CLICKS, drawn, None, None, None, None, message

    def new_upload(self, path, domain):
        """A new upload: a volume starts at its middle slice, and only volumes show the slice field."""
        outputs = self.new_slice(path, None, domain)
        try:
            middle = self.load(path, None, domain).slice_index if path is not None else None
        except DemoInputError:
            middle = None
        return (gr.update(value=middle, visible=middle is not None), *outputs)

    def redraw(self, path, slice_index, domain, box_text, clicks):
        """Redraw the prompt image only (warnings come from `show` and `run`)."""
        try:
            return self.drawn(path, slice_index, domain, box_text, clicks)[0]
        except DemoInputError:
            return None

    def run(self, path, slice_index, domain, box_text, clicks):
        """The page's prediction: overlays, numbers, label-map file and a summary, or a warning."""
        try:
            image = self.load(path, slice_index, domain)
            prompt = self.prompt_of(box_text, clicks)
            result = self.predictor.compare(image, prompt, domain=domain)
        except DemoInputError as err:
            gr.Warning(str(err))
            return None, None, None, None, str(err)
        numbers = result.numbers()
        folder = Path(tempfile.mkdtemp(dir=self.downloads.name))
        labels = save_label_map(result.label_map(), folder / f"{Path(path).name.split('.')[0]}_{domain}_labels.png")
        summary = (f"{image.description}\nbase: {numbers['base_area']} px (predicted IoU "
                   f"{numbers['base_predicted_iou']:.3f}); fine-tuned ({domain}): {numbers['adapter_area']} px "
                   f"(predicted IoU {numbers['adapter_predicted_iou']:.3f}); IoU between them "
                   f"{numbers['iou_between']:.4f}")
        return (*overlays(image, result, prompt), numbers, str(labels), summary)

    def run_if_complete(self, path, slice_index, domain, box_text, clicks):
        """After a click: predict once the prompt is complete (not while a box has only its first corner)."""
        if clicks["corner"] is not None or (not clicks["points"] and not (box_text or "").strip()):
            return (gr.skip(),) * 5
        return self.run(path, slice_index, domain, box_text, clicks)

    @staticmethod
    def click(mode, box_text, clicks, evt: gr.SelectData):
        """Add a corner or a point at the clicked pixel."""
        x, y = (float(v) for v in evt.index)
        clicks = {key: list(value) if isinstance(value, list) else value for key, value in clicks.items()}
        if mode == BOX_MODE and clicks["corner"] is None:
            clicks["corner"] = (x, y)
        elif mode == BOX_MODE:
            (x0, y0), clicks["corner"] = clicks["corner"], None
            box_text = f"{min(x0, x):g},{min(y0, y):g},{max(x0, x):g},{max(y0, y):g}"
        else:  # a box begun in box mode is dropped
            clicks["corner"] = None
            clicks["points"].append((x, y))
            clicks["labels"].append(POSITIVE if mode == POSITIVE_MODE else NEGATIVE)
        return box_text, clicks

    def api_segment(self, image, box, domain, slice_index=None):
        """The `segment` endpoint: an image file and a box -> base overlay, fine-tuned overlay, numbers."""
        try:
            image = self.load(image, slice_index, domain)
            prompt = Prompt(parse_box(box))
            if prompt.box is None:
                raise DemoInputError("No box: give `box` as 'x1,y1,x2,y2' in the image's pixels.")
            result = self.predictor.compare(image, prompt, domain=domain)
        except DemoInputError as err:
            raise gr.Error(str(err)) from None
        return (*overlays(image, result, prompt), result.numbers())


def _layout(domains: list[str]) -> SimpleNamespace:
    """Place the page's components (inside a `gr.Blocks`); returns them by name."""
    page = SimpleNamespace(clicks=gr.State(NO_CLICKS))
    with gr.Row():
        with gr.Column():
            page.upload = gr.File(label="Image", file_types=FILE_TYPES, elem_id="upload")
            with gr.Row():
                page.slice_index = gr.Number(label="NIfTI slice (starts at the middle)", precision=0,
                                             visible=False, elem_id="slice")
                page.domain = gr.Dropdown(domains, value=domains[0], label="Domain adapter", elem_id="domain")
            page.mode = gr.Radio([BOX_MODE, POSITIVE_MODE, NEGATIVE_MODE], value=BOX_MODE, label="A click adds",
                                 elem_id="mode")
            with gr.Row():
                page.box_text = gr.Textbox(label="Box x1,y1,x2,y2 (image pixels)", elem_id="box", scale=3)
                page.segment = gr.Button("Segment", variant="primary", elem_id="segment")
                page.clear = gr.Button("Clear prompts", elem_id="clear")
            page.prompt_image = gr.Image(label="Click here (as the model sees it)", interactive=False, format="png",
                                         elem_id="prompt-image", buttons=[])
            page.info = gr.Textbox(label="Messages", interactive=False, lines=3, elem_id="info")
        with gr.Column():
            with gr.Row():
                page.base_out = gr.Image(label="Base model", format="png", interactive=False, elem_id="base-overlay")
                page.adapter_out = gr.Image(label="Fine-tuned", format="png", interactive=False,
                                            elem_id="adapter-overlay")
            page.numbers = gr.JSON(label="Areas (pixels) and IoUs", elem_id="numbers")
            page.label_map = gr.File(label="Fine-tuned label map (16-bit PNG)", interactive=False, elem_id="label-map")
    page.api_trigger = gr.Button(visible=False)
    return page


def _wire(page: SimpleNamespace, on: Handlers) -> None:
    """Connect the components' events to the handlers, and the `segment` API endpoint."""
    private = dict(api_visibility="private", concurrency_id="model")
    view = [page.upload, page.slice_index, page.domain, page.box_text, page.clicks]
    results = [page.base_out, page.adapter_out, page.numbers, page.label_map, page.info]
    page.upload.change(on.new_upload, [page.upload, page.domain],
                       [page.slice_index, page.box_text, page.clicks, page.prompt_image, *results], **private)
    # `input`, not `change`: setting the middle slice after an upload must not count as the user's choice.
    page.slice_index.input(on.new_slice, [page.upload, page.slice_index, page.domain],
                           [page.box_text, page.clicks, page.prompt_image, *results], trigger_mode="always_last",
                           **private)
    page.domain.change(on.show, view, [page.prompt_image, page.info], **private).then(
        on.run_if_complete, view, results, **private)
    # "multiple": a second corner clicked while the first is being drawn is queued, not dropped ("once").
    page.prompt_image.select(on.click, [page.mode, page.box_text, page.clicks], [page.box_text, page.clicks],
                             trigger_mode="multiple", **private).then(
        on.redraw, view, page.prompt_image, **private).then(on.run_if_complete, view, results, **private)
    gr.on([page.segment.click, page.box_text.submit], on.run, view, results, **private).then(
        on.redraw, view, page.prompt_image, **private)
    page.clear.click(lambda: ("", NO_CLICKS), None, [page.box_text, page.clicks], **private).then(
        on.show, view, [page.prompt_image, page.info], **private)
    page.api_trigger.click(on.api_segment, [page.upload, page.box_text, page.domain, page.slice_index],
                           [page.base_out, page.adapter_out, page.numbers], api_name="segment", concurrency_id="model")
