"""Build an open_clip model by architecture name, with optional pretrained weights.

``pretrained`` is either an open_clip tag (open_clip downloads it, on machines with internet)
or the path of a local checkpoint (what a warm start writes, or a user's own weights). The
project registers one extra architecture, ``fedclip-tiny`` (3.4M parameters, 32 px images),
through open_clip's own config registry so that it trains on a CPU in seconds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from fedclip.models.trainable import TrainableSpec, apply_trainable

TINY_ARCH = "fedclip-tiny"
open_clip.add_model_config(Path(__file__).parent / "configs")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build. ``pretrained`` is "" (random init), an open_clip tag or a file path."""

    arch: str = TINY_ARCH
    pretrained: str = ""
    trainable: str = "all"

    def __post_init__(self) -> None:
        if self.arch not in open_clip.list_models():
            raise ValueError(f"arch: unknown open_clip architecture {self.arch!r}; see open_clip.list_models()")
        spec = TrainableSpec.parse(self.trainable)
        if spec.mode == "last":
            cfg = open_clip.get_model_config(self.arch) or {}
            for tower in ("vision_cfg", "text_cfg"):
                layers = cfg.get(tower, {}).get("layers")
                if isinstance(layers, int) and spec.last_k > layers:
                    raise ValueError(
                        f"trainable: last-{spec.last_k} but {self.arch}'s {tower.split('_')[0]} tower "
                        f"has {layers} blocks"
                    )
        if spec.mode == "lora":
            cfg = open_clip.get_model_config(self.arch) or {}
            vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
            if not isinstance(vision.get("layers"), int) or vision.get("timm_model_name"):
                raise ValueError(
                    f"trainable: {self.trainable!r} needs transformer blocks in the image tower; {self.arch}'s is "
                    "a ResNet or a timm model (use 'bias', 'projections' or 'all')"
                )
            if text.get("hf_model_name"):
                raise ValueError(
                    f"trainable: {self.trainable!r} needs open_clip's own text transformer; {self.arch}'s text "
                    "tower is a Hugging Face model"
                )
        if self.pretrained and not Path(self.pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            if self.pretrained not in tags:
                raise ValueError(
                    f"pretrained: {self.pretrained!r} is neither a file nor an open_clip tag of {self.arch} "
                    f"(tags: {tags or 'none'})"
                )


@dataclass(frozen=True)
class ClipBundle:
    """A model with the image preprocessing and tokenizer that belong to it."""

    model: open_clip.CLIP
    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    config: ModelConfig


def create_model(config: ModelConfig, *, device: str | torch.device = "cpu") -> ClipBundle:
    """Build the model, load weights if asked, add LoRA adapters if asked, and mark the trainable
    parameters."""
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.arch, pretrained=config.pretrained or None, device=device
        )
    except Exception as exc:  # open_clip and torch.load raise many types for one cause: bad weights
        raise RuntimeError(f"pretrained: could not load {config.pretrained!r} for {config.arch}: {exc}") from exc
    spec = TrainableSpec.parse(config.trainable)
    if spec.mode == "lora":  # after the weights are loaded: adapters rename the weights they wrap
        from fedclip.models.lora import add_lora

        add_lora(model, spec)
    apply_trainable(model, spec)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(config.arch), config=config)


def save_checkpoint(model: torch.nn.Module, path: str | Path, **meta: object) -> Path:
    """Write an open_clip-loadable checkpoint (``{"state_dict": ...}``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(
        f"{path.suffix}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    )  # concurrent writers never collide
    torch.save({"state_dict": model.state_dict(), **meta}, tmp)
    tmp.replace(path)
    return path
