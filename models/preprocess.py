"""Images and texts to model inputs. Every image is resized to the model's square input size, so
all images of a batch share one size (required for batching and by the ViLT reduced forward)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def for_model(cls, config, name_or_path: str | Path | None) -> ImagePreprocessor:
        """Input size from the model config; normalisation from the checkpoint's image processor
        (preprocessor_config.json), 0.5 / 0.5 when it has none."""
        mean, std = cls.mean, cls.std
        if name_or_path is not None and not str(name_or_path).startswith("random:"):
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(name_or_path)
                mean, std = tuple(processor.image_mean), tuple(processor.image_std)
            except (OSError, ValueError, AttributeError, TypeError):
                pass
        return cls(size=int(config.image_size), mean=mean, std=std)

    def to_array(self, image: Image.Image | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32) / 255.0

    def arrays(self, images: list) -> np.ndarray:
        """PIL images or arrays -> (B, 3, size, size) float32, normalised. In numpy: the service
        runs this outside the inference thread, where torch would start another OpenMP pool."""
        batch = np.stack([self.to_array(im) for im in images])
        batch = (batch - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def __call__(self, images: list) -> torch.Tensor:
        """PIL images or arrays -> (B, 3, size, size) tensor."""
        return torch.from_numpy(self.arrays(images))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def from_uint8(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 already at the input size (data sets) -> normalised tensor."""
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bilinear")
        return self.normalize(pixels)
