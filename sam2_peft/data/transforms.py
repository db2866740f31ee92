"""SAM2 preprocessing (square resize + ImageNet normalisation) and joint training augmentation.

Preprocessing follows what the pretrained weights saw, which is what official SAM2 (`SAM2Transforms`) and
transformers' `Sam2ImageProcessor` both do: resize straight to S x S (aspect ratio not kept, no padding), bilinear
with antialiasing, scale to [0, 1], normalise with the ImageNet mean/std. Prompt coordinates follow the same map
(x * S / W, y * S / H). We resize float images, as official SAM2 does; `Sam2ImageProcessor` resizes uint8 images
before converting, so on 8-bit input the two differ by its integer rounding (at most one 8-bit level).

Augmentation uses torchvision.transforms.v2 rather than albumentations: torchvision is already a dependency, v2
works on tensors of any dtype (16-bit-derived float images go through untouched by 8-bit conversions), and its
`tv_tensors.Mask` type makes one call transform the image and the label map together, with the label map always
resampled nearest-neighbour and photometric changes applied to the image only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sam2_peft.data.io import DataError
from sam2_peft.models import build_image_processor
from sam2_peft.segmenter import base_sam2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessor:
    """Resize and normalise images, label maps and prompt coordinates for a model of input size S.

    Attributes:
        image_size: S, the model's square input side (`prompt_encoder_config.image_size`).
        image_mean: per-channel mean subtracted after scaling to [0, 1].
        image_std: per-channel std divided by.
    """

    image_size: int = 1024
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_processor(cls, processor) -> Preprocessor:
        """Take S, mean and std from a `Sam2ImageProcessor` (e.g. `sam2_peft.models.build_image_processor(model)`)."""
        size = processor.size
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        if height != width:
            raise DataError(f"The image processor resizes to {height}x{width}; SAM2 models take square inputs.")
        return cls(int(height), tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std)))

    @classmethod
    def from_model(cls, model) -> Preprocessor:
        """Match a `Sam2Model` (or a PeftModel around one)."""
        return cls.from_processor(build_image_processor(base_sam2(model)))

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution mask prompts and logits (S / 4)."""
        return self.image_size // 4

    def pixel_values(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float in [0, 1] -> (3, S, S) float32 normalised."""
        size = [self.image_size, self.image_size]
        resized = TF.resize(image.float(), size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return TF.normalize(resized, list(self.image_mean), list(self.image_std))

    def resize_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(H, W) integer label map -> (S, S) int64, nearest neighbour at pixel centres (as `Sam2ImageProcessor`)."""
        # float32 holds label values exactly up to 2**24, far beyond any real object count.
        resized = F.interpolate(labels[None, None].float(), size=(self.image_size,) * 2, mode="nearest-exact")
        return resized[0, 0].long()

    def scale_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map `x, y` pixel coordinates (..., 2) of an (H, W) image to model-input coordinates."""
        height, width = original_size
        scale = torch.tensor([self.image_size / width, self.image_size / height], dtype=torch.float32)
        return coords.float() * scale


@dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation; set a field to 0 / None to switch that part off.

    Attributes:
        crop_prob: probability of a random resized crop (output keeps the input's size).
        crop_scale: area fraction range of that crop.
        hflip_prob: probability of a horizontal flip.
        vflip_prob: probability of a vertical flip (fine for micrographs; switch off for anatomy with a "down").
        rot90: rotate by a random multiple of 90 degrees.
        zoom: scale range of a random zoom about the centre (values < 1 zoom out, padding with background).
        brightness: brightness jitter factor (ColorJitter semantics).
        contrast: contrast jitter factor.
        gamma: range of a random gamma applied to the [0, 1] image.
    """

    crop_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90: bool = True
    zoom: tuple[float, float] | None = (0.8, 1.2)
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: tuple[float, float] | None = (0.8, 1.25)


class RandomRot90(v2.Transform):
    """Rotate image and mask by the same random multiple of 90 degrees (exact: no resampling)."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt, params):
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


class RandomGamma(v2.Transform):
    """Raise the [0, 1] image to a random power; masks are left alone."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma: tuple[float, float]):
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs):
        low, high = self.gamma
        return {"gamma": float(torch.empty(()).uniform_(low, high).item())}

    def transform(self, inpt, params):
        return tv_tensors.wrap(inpt.clamp(0, 1) ** params["gamma"], like=inpt)


class JointAugment:
    """Apply one random draw of `AugmentConfig` to an image and its label map together.

    Randomness comes from torch's global generator; the training dataset seeds it per (seed, epoch, index).

    Example:
        >>> augment = JointAugment(AugmentConfig())
        >>> image, labels = augment(torch.rand(3, 64, 48), torch.zeros(64, 48, dtype=torch.long))
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()):
        self.config = config
        photometric = []
        if config.brightness or config.contrast:
            photometric.append(v2.ColorJitter(brightness=config.brightness, contrast=config.contrast))
        if config.gamma:
            photometric.append(RandomGamma(config.gamma))
        self._photometric = photometric

    @property
    def changes_pixels(self) -> bool:
        """Whether the image can differ from the unaugmented one (then cached image features are invalid)."""
        c = self.config
        return bool(c.crop_prob or c.hflip_prob or c.vflip_prob or c.rot90 or c.zoom or self._photometric)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a (3, H, W) float image in [0, 1] and its (H, W) int64 label map; the size may change (rot90)."""
        c = self.config
        height, width = labels.shape
        steps = []
        if c.crop_prob:
            crop = v2.RandomResizedCrop((height, width), scale=c.crop_scale, antialias=True)
            steps.append(v2.RandomApply([crop], p=c.crop_prob))
        if c.hflip_prob:
            steps.append(v2.RandomHorizontalFlip(c.hflip_prob))
        if c.vflip_prob:
            steps.append(v2.RandomVerticalFlip(c.vflip_prob))
        if c.rot90:
            steps.append(RandomRot90())
        if c.zoom:
            steps.append(v2.RandomAffine(degrees=0.0, scale=c.zoom))
        pipeline = v2.Compose(steps + self._photometric)
        out_image, out_labels = pipeline(tv_tensors.Image(image), tv_tensors.Mask(labels[None]))
        return out_image.as_subclass(torch.Tensor).clamp(0, 1), out_labels.as_subclass(torch.Tensor)[0]
