"""Several domain adapters on one base: load by name, switch per call, hot-swap in place, mix within a batch.

    domains = DomainAdapters(load_sam2("facebook/sam2.1-hiera-tiny"))
    domains.add("ct", "user/sam2-lora-ct").add("dermo", "runs/dermo/final")
    out = predict(domains, pixel_values, boxes, domain="ct")                 # one domain
    out = predict(domains, pixel_values, boxes, domain=["ct", "dermo"])      # one domain per image

Mixed-domain batches run one sub-batch per domain (`set_adapter`), not through PEFT's `adapter_names=`: PEFT's
mixed-batch LoRA indexes each adapted layer's input by batch row, but Hiera's windowed blocks fold windows into
the batch axis before `attn.qkv` (B images -> B * windows rows) and the mask decoder sees one row per object, so
row `i` of a layer is not image `i` and `adapter_names` would silently mix domains.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from torch import nn

from sam2_peft.hub.files import PEFT_CONFIG, PEFT_WEIGHTS, read_json, resolve_adapter
from sam2_peft.hub.load import check_compatible, load_adapter
from sam2_peft.hub.preprocessing import (
    AdapterPreprocessing,
    adapter_preprocessing,
    read_preprocessing,
    record_preprocessing,
)
from sam2_peft.segmenter import Sam2Segmenter, SegmenterOutput, combine_prompts


class DomainAdapters:
    """A registry of named PEFT adapters on one base model.

    Args:
        model: a `Sam2Model`, or a `PeftModel` whose adapters become the first domains.

    Attributes:
        model: the `PeftModel` once a domain is added (the same object for the registry's lifetime after that).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def names(self) -> list[str]:
        """The registered domains, in the order they were added."""
        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    @property
    def active(self) -> str | None:
        """The domain the next call runs with."""
        return self.model.active_adapter if isinstance(self.model, PeftModel) else None

    def add(self, name: str, adapter: str | os.PathLike, *, revision: str | None = None) -> DomainAdapters:
        """Load a PEFT adapter (local folder or Hub id) as domain `name`; the active domain does not change.

        Example:
            >>> domains.add("ct", "user/sam2-lora-ct", revision="v1").use("ct")
        """
        if name in self.names:
            raise ValueError(f"Domain {name!r} is already registered; use `.hotswap({name!r}, ...)` to replace it.")
        folder = self._peft_folder(adapter, revision)
        first = not isinstance(self.model, PeftModel)
        self.model = load_adapter(self.model, folder, adapter_name=name)
        if first:
            self.model.eval()
        return self

    def use(self, name: str) -> DomainAdapters:
        """Make domain `name` the active adapter (PEFT `set_adapter`)."""
        self._require(name)
        self.model.set_adapter(name, inference_mode=True)
        return self

    def hotswap(self, name: str, adapter: str | os.PathLike, *, revision: str | None = None) -> DomainAdapters:
        """Replace domain `name`'s weights in place with another LoRA adapter's (PEFT `hotswap_adapter`).

        No module is added or removed, so a `torch.compile`d model keeps its graph: call `prepare_for_compile`
        before compiling when the adapters' ranks or alphas differ. Only plain LoRA adapters without
        `modules_to_save` can be hot-swapped; register others with `.add(...)` and switch with `.use(...)`.
        """
        self._require(name)
        folder = self._peft_folder(adapter, revision)
        config = read_json(folder, PEFT_CONFIG)
        reasons = []
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            reasons.append(f"it is {'DoRA' if config.get('use_dora') else config.get('peft_type')}, not plain LoRA")
        if config.get("modules_to_save"):
            reasons.append(f"it saves whole modules ({config['modules_to_save']}), which PEFT cannot hot-swap")
        if reasons:
            raise ValueError(
                f"Adapter {str(adapter)!r} cannot be hot-swapped into domain {name!r}: {'; '.join(reasons)}. "
                f"Register it as its own domain instead: `.add('<new name>', {str(adapter)!r})` then `.use(...)`."
            )
        check_compatible(self.model, folder, where=f"adapter {str(adapter)!r}")
        preprocessing = read_preprocessing(folder, self.model)
        device = next(self.model.parameters()).device
        hotswap_adapter(self.model, str(folder), adapter_name=name, torch_device=str(device))
        record_preprocessing(self.model, name, preprocessing)
        return self

    def preprocessing(self, name: str) -> AdapterPreprocessing | None:
        """The preprocessing domain `name`'s adapter was trained with (None for adapters saved without one).

        Example:
            >>> pixels = normalize_intensity(image, domains.preprocessing("ct").intensity_config())
        """
        self._require(name)
        return adapter_preprocessing(self.model, name)

    def prepare_for_compile(self, target_rank: int) -> DomainAdapters:
        """Pad the LoRA weights to `target_rank` (the largest rank you will hot-swap in) before `torch.compile`.

        Hot-swapping then only copies weights into fixed-shape tensors, which compiled graphs tolerate
        (PEFT `prepare_model_for_compiled_hotswap`).
        """
        prepare_model_for_compiled_hotswap(self.model, target_rank=target_rank)
        return self

    def combine(
        self,
        names: Sequence[str],
        weights: Sequence[float],
        new_name: str,
        combination_type: str = "linear",
        **options,
    ) -> DomainAdapters:
        """Register a weighted combination of LoRA domains as a new domain (PEFT `add_weighted_adapter`).

        Args:
            names: the domains to combine.
            weights: one weight per domain.
            new_name: the new domain's name.
            combination_type: `linear` (same ranks), `cat`, `svd`, `ties`, `dare_linear`, ... as PEFT supports.
            **options: PEFT's further options (`svd_rank`, `density`, ...).
        """
        for name in names:
            self._require(name)
        if len(weights) != len(names):
            raise ValueError(f"Got {len(weights)} weights for {len(names)} domains {list(names)}; give one each.")
        self.model.add_weighted_adapter(list(names), list(weights), new_name, combination_type=combination_type,
                                        **options)
        # A combination keeps its parts' preprocessing when they agree; otherwise there is none to apply.
        records = [adapter_preprocessing(self.model, name) for name in names]
        agreed = all(record == records[0] for record in records)
        record_preprocessing(self.model, new_name, records[0] if agreed else None)
        return self

    def _require(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(
                f"Unknown domain {name!r}; registered: {self.names or 'none'}. Add it with `.add(name, path)`."
            )

    @staticmethod
    def _peft_folder(adapter: str | os.PathLike, revision: str | None):
        folder = resolve_adapter(adapter, revision)
        if not (folder / PEFT_WEIGHTS).is_file():
            raise ValueError(
                f"Adapter {str(adapter)!r} holds trained tensors (decoder/partial/full/memory), not a PEFT adapter, so it "
                "cannot be one of several domains on a shared base. Load it alone with `load_adapter`."
            )
        return folder


@torch.no_grad()
def predict(
    model: nn.Module | DomainAdapters,
    pixel_values: torch.Tensor,
    boxes: torch.Tensor,
    *,
    image_index: torch.Tensor | None = None,
    domain: str | Sequence[str] | None = None,
    multimask_output: bool = False,
) -> SegmenterOutput:
    """Segment boxed objects, each image with its domain's adapter.

    Args:
        model: a `DomainAdapters`, a `PeftModel` or a `Sam2Model`.
        pixel_values: (B, 3, S, S) normalised images (see `build_image_processor`).
        boxes: (N, 4) `x1, y1, x2, y2` in model-input pixels.
        image_index: (N,) the image of each box; default one box per image (N == B).
        domain: None (the active adapter), one domain for the batch, or a list of B domains, one per image.
        multimask_output: three candidate masks per object instead of one.

    Returns:
        `SegmenterOutput` for the N objects, in the order of `boxes`. The active domain is restored afterwards.

    Example:
        >>> out = predict(domains, pixel_values, boxes, domain=["ct", "mri"])
        >>> out.mask_logits.shape      # (N, 1, S / 4, S / 4)
    """
    if boxes.shape[0] == 0:
        raise ValueError("`boxes` is empty; give at least one (N, 4) box to segment.")
    peft_model = model.model if isinstance(model, DomainAdapters) else model
    if image_index is None:
        image_index = torch.arange(boxes.shape[0], device=boxes.device)
    coords, labels = combine_prompts(boxes=boxes)
    segmenter = Sam2Segmenter(peft_model)
    if domain is None:
        return segmenter(pixel_values, image_index=image_index, point_coords=coords, point_labels=labels,
                         multimask_output=multimask_output)
    domains = [domain] * pixel_values.shape[0] if isinstance(domain, str) else list(domain)
    if len(domains) != pixel_values.shape[0]:
        raise ValueError(f"domain has {len(domains)} entries for {pixel_values.shape[0]} images; give one per image.")
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"domain={domain!r} needs adapters; register them with `DomainAdapters(model).add(...)`.")
    unknown = sorted(set(domains) - set(peft_model.peft_config))
    if unknown:
        raise KeyError(f"Unknown domain(s) {unknown}; registered: {list(peft_model.peft_config)}.")
    previous = peft_model.active_adapter
    parts: list[tuple[torch.Tensor, SegmenterOutput]] = []
    try:
        for name in dict.fromkeys(domains):
            images = torch.tensor([i for i, d in enumerate(domains) if d == name], device=image_index.device)
            objects = torch.nonzero(torch.isin(image_index, images)).flatten()
            if objects.numel() == 0:
                continue
            # Renumber the sub-batch's images 0..len(images)-1 for the segmenter.
            local_index = torch.searchsorted(images, image_index[objects])
            peft_model.set_adapter(name, inference_mode=True)
            parts.append((objects, segmenter(pixel_values[images], image_index=local_index,
                                             point_coords=coords[objects], point_labels=labels[objects],
                                             multimask_output=multimask_output)))
    finally:
        peft_model.set_adapter(previous, inference_mode=True)
    return _scatter(parts, boxes.shape[0])


def _scatter(parts: list[tuple[torch.Tensor, SegmenterOutput]], num_objects: int) -> SegmenterOutput:
    fields = {}
    for field in ("mask_logits", "iou_scores", "object_score_logits"):
        first = getattr(parts[0][1], field)
        merged = first.new_empty((num_objects, *first.shape[1:]))
        for objects, output in parts:
            merged[objects] = getattr(output, field)
        fields[field] = merged
    return SegmenterOutput(**fields)
