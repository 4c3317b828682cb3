"""What a site sends each round, per trainable set: the bytes of its reply's arrays (Flower's
``ArrayRecord`` as the site builds it, ``model_to_arrays(trainable_only=True)``), against the whole
model's, and the noised coordinates (the noise dimension of each DP step).

    python -m benchmarks.reply_bytes [--model ViT-B-32] [--trainable all,last-1,projections,bias,lora-8]

Random initialisation (no download): the sizes do not depend on the weights.
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd


def measure(model_name: str, trainable_sets: list[str]) -> pd.DataFrame:
    from fedclip.models.arrays import model_to_arrays
    from fedclip.models.factory import ModelConfig, create_model

    rows = []
    full_bytes = None
    for trainable in trainable_sets:
        model = create_model(ModelConfig(arch=model_name, trainable=trainable)).model
        if full_bytes is None:
            full_bytes = sum(len(a.data) for a in model_to_arrays(model).values())
        reply = model_to_arrays(model, trainable_only=True)
        sent = sum(len(a.data) for a in reply.values())
        noised = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "model": model_name,
                "trainable": trainable,
                "arrays": len(reply),
                "noised_coordinates": noised,
                "reply_MB": sent / 1e6,
                "full_model_MB": full_bytes / 1e6,
                "reply_share_pct": 100 * sent / full_bytes,
            }
        )
        del model
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--trainable", default="all,last-1,projections,bias,lora-8,lora-8-attn,lora-8-mlp")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    table = measure(args.model, args.trainable.split(","))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
