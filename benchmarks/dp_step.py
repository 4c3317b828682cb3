"""DP step against a non-private step: same model, same 128 pairs, several micro-batch counts.

    python -m benchmarks.dp_step [--pairs 128] [--repeats 5] [--device cpu]

Each configuration runs in its own process so that its peak memory (ru_maxrss, CPU; CUDA peak
allocation on a GPU) is its own. Prints a table of seconds per step and the ratio DP / plain,
both measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _one(k: int, trainable: str, pairs: int, repeats: int, device: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.local import make_optimizer
    from fedclip.training.loss import clip_loss
    from fedclip.training.microbatch_grads import per_microbatch_grads

    torch.manual_seed(0)
    model = create_model(ModelConfig(trainable=trainable), device=device).model
    images = torch.randn(pairs, 3, 32, 32, device=device)
    tokens = torch.randint(1, 40000, (pairs, 32), device=device)
    tokens[:, 12], tokens[:, 13:] = 49407, 0
    groups = np.array_split(np.arange(pairs), k)
    dp = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, microbatch_size=max(1, pairs // k), declared_units=pairs)
    dp_opt = make_optimizer(model, dp, TrainConfig(), expected_microbatches=k, noise_generator=None)
    plain_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def dp_step() -> None:
        grads, _ = per_microbatch_grads(model, groups, images, tokens)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    def plain_step() -> None:
        image_f, text_f, scale = model(images, tokens)
        loss = clip_loss(image_f, text_f, scale)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def timed(fn) -> float:
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        best = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best.append(time.perf_counter() - t)
        return float(np.median(best))

    plain = timed(plain_step)
    dp_time = timed(dp_step)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"microbatches": k, "trainable": trainable, "trainable_params": trainable_params, "plain_s": plain,
            "dp_s": dp_time, "ratio": dp_time / plain, "grad_sample_MiB": k * trainable_params * 4 / 2**20,
            "peak_MiB": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("K", "TRAINABLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.pairs, args.repeats, args.device)))
        return 0
    rows = []
    for trainable in ("all", "last-1"):
        for k in (1, 4, 16):
            cmd = [sys.executable, "-m", "benchmarks.dp_step", "--one", str(k), trainable, "--pairs", str(args.pairs),
                   "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            r = rows[-1]
            print(f"  K={k:>2} trainable={trainable:<7} plain {r['plain_s']*1e3:7.1f} ms  dp {r['dp_s']*1e3:7.1f} ms  "
                  f"ratio {r['ratio']:.2f}x  peak {r['peak_MiB']:.0f} MiB", flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    print(f"\n{args.pairs} pairs per step, device {args.device}, torch {torch.__version__}, median of {args.repeats}")
    print(table.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
