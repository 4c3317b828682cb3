"""The data, warm start and evaluation that the utility benchmarks share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fedclip.data.names import DEFAULT_NAME_LISTS
from fedclip.data.tensors import PairData


@dataclass(frozen=True)
class Bench:
    checkpoint: Path
    sites: dict[str, PairData]  # each site's training pairs
    public: PairData
    test: PairData
    tokenizer: Callable
    warm: float  # zero-shot accuracy of the warm start on the held-out patients

    def accuracy(self, model: torch.nn.Module) -> float:
        from fedclip.evaluation.zero_shot import zero_shot_accuracy

        return zero_shot_accuracy(model, self.tokenizer, self.test)

    def model(self, trainable: str) -> torch.nn.Module:
        from fedclip.models.factory import ModelConfig, create_model

        return create_model(ModelConfig(pretrained=str(self.checkpoint), trainable=trainable)).model


def calibrated(dp, *, epsilon: float, steps: int):
    """``dp`` with the noise multiplier that meets ``epsilon`` over ``steps`` steps (its own relation
    and sensitivity); a non-private config is returned as it is."""
    from dataclasses import replace

    from fedclip.privacy.calibration import calibrate_noise_multiplier
    from fedclip.training.config import Mode

    if dp.mode == Mode.NONPRIVATE:
        return dp
    sigma = calibrate_noise_multiplier(
        target_epsilon=epsilon,
        delta=dp.delta,
        sample_rate=dp.sample_rate,
        steps=steps,
        relation=dp.relation,
        sensitivity=dp.sensitivity,
    )
    return replace(dp, noise_multiplier=sigma)


def prepare(
    out: Path, *, num_sites: int, patients_per_site: int, name_lists: str = DEFAULT_NAME_LISTS, **data: Any
) -> Bench:
    """Synthetic sites of the realistic size, 500 public and 250 held-out patients, cached warm start;
    ``data``: other ``SyntheticConfig`` fields."""
    from fedclip.data.manifest import load_manifest
    from fedclip.data.partition import partition_by_site
    from fedclip.data.schema import Split
    from fedclip.data.synthetic import SyntheticConfig, generate
    from fedclip.data.tensors import load_pairs
    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.warmstart import WarmStartConfig, warm_start

    config = SyntheticConfig(
        num_sites=num_sites,
        patients_per_site=patients_per_site,
        public_patients=500,
        heldout_patients=250,
        name_lists=name_lists,
        **data,
    )
    manifest = generate(out / "data", config)
    checkpoint = warm_start(manifest, cache_dir=out / "cache", config=WarmStartConfig())
    frame = load_manifest(manifest)
    bundle = create_model(ModelConfig(pretrained=str(checkpoint)))

    def pairs(rows) -> PairData:
        return load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)

    train = frame.rows(Split.TRAIN)
    sites = {site: pairs(rows) for site, rows in sorted(partition_by_site(train).items())}
    test = pairs(frame.rows(Split.HELDOUT))
    bench = Bench(
        checkpoint=checkpoint,
        sites=sites,
        public=pairs(frame.rows(Split.PUBLIC)),
        test=test,
        tokenizer=bundle.tokenizer,
        warm=0.0,
    )
    return Bench(**{**bench.__dict__, "warm": bench.accuracy(bundle.model)})
