"""Images as the privatizers see them: RGB pixels in [0, 1] at the network's size, and back to PNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pixels(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """A ``preprocess`` for ``fedclip.data.tensors.load_images``: [3, size, size] in [0, 1]."""

    def convert(image: Image.Image) -> torch.Tensor:
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return (
            torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        )

    return convert


def save_png(pixels: torch.Tensor, path: str | Path) -> None:
    """[3, H, W] in [0, 1] as an 8-bit PNG."""
    array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path, optimize=False)
