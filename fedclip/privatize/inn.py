"""A conditional invertible network: image <-> Gaussian latent, conditioned on the image's label.

GLOW-style (Kingma and Dhariwal 2018) as CADP uses it: invertible downsampling (IRevNet), affine
coupling blocks whose subnetworks see a one-hot label map at every scale, fixed random channel
permutations, and fully connected couplings on the flattened latent. Built with FrEIA, the
library the CADP authors used. Trained by maximum likelihood: the latent is standard normal, so
log p(x | y) = log N(f(x; y)) + log |det df/dx|.

The label has one more value than the classes, ``unknown``: training drops the label with
probability ``label_dropout``, so the same network also encodes and decodes without a label
(what a privatizer uses when it releases no label).

Train it on *public* images only (the population the warm start uses): a network fitted to a
site's private images would memorise them, and releasing privatized images decoded by it would
release that memory outside any accounting (one of the published code's faults).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedclip.data.schema import CONDITIONS


@dataclass(frozen=True, kw_only=True)
class InnConfig:
    image_size: int = 32
    channels: int = 3
    labels: tuple[str, ...] = CONDITIONS  # the condition values the network is conditioned on
    blocks_per_scale: int = 4
    width: int = 64  # hidden channels of the convolutional subnetworks
    dense_blocks: int = 2
    dense_width: int = 256
    clamp: float = 1.5  # soft clamp of the coupling scales: keeps inversion exact and stable
    label_dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size: expected a multiple of 4 (two downsamplings), got {self.image_size}")
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"inn labels: expected distinct label names, got {list(self.labels)}")
        for key in ("channels", "blocks_per_scale", "width", "dense_width"):
            if getattr(self, key) < 1:
                raise ValueError(f"inn {key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.dense_blocks < 0:
            raise ValueError(f"inn dense_blocks: expected an integer >= 0, got {self.dense_blocks}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"inn label_dropout: expected a probability in [0, 1), got {self.label_dropout}")

    @property
    def classes(self) -> int:
        return len(self.labels)

    def label_indices(self, values) -> torch.Tensor:
        """Label names to indices; a value the network does not know is an error naming it."""
        index = {name: k for k, name in enumerate(self.labels)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise ValueError(f"condition: {unknown[:3]} not among the INN's labels {list(self.labels)}")
        return torch.tensor([index[str(v)] for v in values], dtype=torch.long)

    @property
    def dims(self) -> int:
        return self.channels * self.image_size**2


def _conv_subnet(width: int):
    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, c_out, 3, padding=1),
        )
        nn.init.zeros_(net[-1].weight)  # every block starts as the identity
        nn.init.zeros_(net[-1].bias)
        return net

    return make


def _dense_subnet(width: int):
    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(nn.Linear(c_in, width), nn.ReLU(), nn.Linear(width, c_out))
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    return make


class ConditionalInn(nn.Module):
    """``encode(x, y) -> (z, log|det|)``, ``decode(z, y) -> x``; ``y`` in 0..classes (classes = unknown)."""

    def __init__(self, config: InnConfig):
        super().__init__()
        self.config = config
        s, k = config.image_size, config.classes + 1
        conds = [
            Ff.ConditionNode(k, s // 2, s // 2, name="label@1/2"),
            Ff.ConditionNode(k, s // 4, s // 4, name="label@1/4"),
            Ff.ConditionNode(k, name="label"),
        ]
        nodes = [Ff.InputNode(config.channels, s, s, name="image")]
        seed = 0
        for scale, cond in enumerate(conds[:2]):
            nodes.append(Ff.Node(nodes[-1], Fm.IRevNetDownsampling, {}, name=f"down{scale}"))
            for _ in range(config.blocks_per_scale):
                nodes.append(
                    Ff.Node(
                        nodes[-1],
                        Fm.GLOWCouplingBlock,
                        {"subnet_constructor": _conv_subnet(config.width), "clamp": config.clamp},
                        conditions=cond,
                    )
                )
                nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": seed}))
                seed += 1
        nodes.append(Ff.Node(nodes[-1], Fm.Flatten, {}, name="flatten"))
        for _ in range(config.dense_blocks):
            nodes.append(
                Ff.Node(
                    nodes[-1],
                    Fm.GLOWCouplingBlock,
                    {"subnet_constructor": _dense_subnet(config.dense_width), "clamp": config.clamp},
                    conditions=conds[2],
                )
            )
            nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": seed}))
            seed += 1
        nodes.append(Ff.OutputNode(nodes[-1], name="latent"))
        self.net = Ff.GraphINN(nodes + conds)

    @property
    def unknown(self) -> int:
        return self.config.classes

    def _conditions(self, labels: torch.Tensor) -> list[torch.Tensor]:
        if labels.min() < 0 or labels.max() > self.unknown:
            raise ValueError(f"labels: expected values in 0..{self.unknown} ({self.unknown} = unknown)")
        onehot = F.one_hot(labels.long(), self.unknown + 1).float()
        s = self.config.image_size
        return [
            onehot[:, :, None, None].expand(-1, -1, s // 2, s // 2),
            onehot[:, :, None, None].expand(-1, -1, s // 4, s // 4),
            onehot,
        ]

    def encode(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(images, c=self._conditions(labels))

    def decode(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, _ = self.net(latents, c=self._conditions(labels), rev=True)
        return images

    def bits_per_dim(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: -log2 p(x | y) / D for 8-bit images scaled to [0, 1] (the usual figure)."""
        z, log_det = self.encode(images, labels)
        log_p = -0.5 * (z.pow(2).sum(dim=1) + z.shape[1] * math.log(2 * math.pi)) + log_det
        return -log_p / (self.config.dims * math.log(2)) + 8.0


def gaussian_bits_per_dim(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """The baseline an INN must beat: an independent Gaussian per pixel fitted on ``train``."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-3)
    log_p = torch.distributions.Normal(mean, std).log_prob(test).flatten(1).sum(dim=1)
    return -log_p / (test[0].numel() * math.log(2)) + 8.0


def train_inn(
    model: ConditionalInn,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress=None,
) -> list[float]:
    """Maximum likelihood on (public) images in [0, 1] with uniform dequantisation; returns the
    mean training bits/dim per epoch. ``progress(epoch, bits)`` is called after each epoch."""
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"train_inn: expected as many labels as images (> 0), got {len(images)} and {len(labels)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx] + torch.rand(images[idx].shape, generator=generator) / 256.0
            y = labels[idx].clone()
            y[torch.rand(len(y), generator=generator) < model.config.label_dropout] = model.unknown
            loss = model.bits_per_dim(x, y).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(images))
        if progress is not None:
            progress(epoch + 1, history[-1])
    model.eval()
    return history


def save_inn(model: ConditionalInn, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs may write the same cached network
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


def load_inn(path: str | Path) -> ConditionalInn:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"inn checkpoint: {path} not found")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = ConditionalInn(InnConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()
