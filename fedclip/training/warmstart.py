"""Non-private warm start on the public population, cached by content.

DP-CLIP fine-tunes an already trained CLIP; a model that starts from random weights under DP
learns almost nothing. The tiny architecture has no published weights, so this pretrains it on
the *public* population (disjoint from every site's patients) and caches the checkpoint under
a key made of the manifest's bytes and every setting, so the same inputs never train twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.tensors import PairData, load_pairs
from fedclip.models.factory import ModelConfig, create_model, save_checkpoint
from fedclip.training.loss import clip_loss


@dataclass(frozen=True)
class WarmStartConfig:
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")


def pretrain(
    model: torch.nn.Module,
    data: PairData,
    config: WarmStartConfig,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Plain CLIP training: shuffled batches, AdamW, full-batch contrastive loss. Returns the
    mean loss of each epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    model.train()
    history = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        losses = []
        for start in range(0, len(data), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:
                continue  # a contrastive loss needs at least one negative
            image_f, text_f, scale = model(data.images[idx].to(device), data.tokens[idx].to(device))
            loss = clip_loss(image_f, text_f, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / max(len(losses), 1))
        if progress:
            progress(epoch + 1, history[-1])
    return history


def _cache_key(manifest: Path, model_config: ModelConfig, config: WarmStartConfig) -> str:
    digest = hashlib.sha256(manifest.read_bytes())
    digest.update(json.dumps([asdict(model_config), asdict(config)], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def warm_start(
    manifest: str | Path,
    *,
    cache_dir: str | Path,
    model_config: ModelConfig = ModelConfig(),
    config: WarmStartConfig = WarmStartConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Return the path of a checkpoint pretrained on the manifest's public rows, training it
    only if no cached checkpoint for exactly these inputs exists."""
    manifest = Path(manifest)
    path = Path(cache_dir) / f"warmstart-{model_config.arch}-{_cache_key(manifest, model_config, config)}.pt"
    if path.is_file():
        return path
    loaded = load_manifest(manifest)
    public = loaded.rows(Split.PUBLIC)
    if len(public) < 2:
        raise ValueError(f"{manifest}: the warm start needs public rows (split 'public'); found {len(public)}")
    torch.manual_seed(config.seed)
    bundle = create_model(model_config)
    data = load_pairs(public, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    pretrain(bundle.model, data, config, progress=progress)
    return save_checkpoint(bundle.model, path, warm_start=asdict(config), manifest=str(manifest))
