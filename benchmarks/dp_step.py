"""DP step against a non-private step: same model, same 128 pairs, K groups, two gradient engines.

    python -m benchmarks.dp_step [--pairs 128] [--repeats 5] [--device cpu] [--ks 1,4,16,64,128]
                                 [--trainable all,last-1,projections] [--engines hooks,vmap]

A DP step = per-group gradients (``hooks``: one backward with Opacus' grad-sample hooks,
``group_grads``; ``vmap``: the reference, ``microbatch_grads``) + Opacus' ``DPOptimizer`` (clip each
group's gradient, sum, noise, scale, step). The plain step is one forward and backward of the same
pairs with the full-batch contrastive loss. ``microbatch`` rows split the pairs into K groups;
``unit`` rows are per-unit DP: K units of pairs/K pairs, each against a bank of 256 public
negatives. ``noise_ms`` is the Gaussian noise alone (Opacus' secure mode, as fedclip runs it:
four draws per coordinate), a cost a plain step never pays. Each configuration runs in its own process so that its peak memory (ru_maxrss, CPU;
CUDA peak allocation on a GPU) is its own; the ratio DP / plain is measured in that one process.
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


def _one(k: int, trainable: str, engine: str, mode: str, pairs: int, repeats: int, device: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.nn.functional as F

    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.group_grads import make_grad_engine
    from fedclip.training.local import make_optimizer
    from fedclip.training.loss import clip_loss
    from fedclip.training.negative_bank import NegativeBank

    torch.manual_seed(0)
    model = create_model(ModelConfig(trainable=trainable), device=device).model
    images = torch.randn(pairs, 3, 32, 32, device=device)
    tokens = torch.randint(1, 40000, (pairs, 32), device=device)
    tokens[:, 12], tokens[:, 13:] = 49407, 0
    groups = np.array_split(np.arange(pairs), k)
    bank = None
    if mode == "unit":
        dim = model.text_projection.shape[1]
        bank = NegativeBank(images=F.normalize(torch.randn(256, dim, device=device), dim=-1),
                            texts=F.normalize(torch.randn(256, dim, device=device), dim=-1))
    dp = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, microbatch_size=max(1, pairs // k), declared_units=pairs)
    dp_opt = make_optimizer(model, dp, TrainConfig(), expected_microbatches=k, noise_generator=None)
    plain_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    grads_of = make_grad_engine(model, engine)

    def dp_step() -> None:
        grads, _, rows = grads_of(groups, images, tokens, bank=bank)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad_sample, p.grad_sample_rows = grads[name], rows.get(name)
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

    from opacus.optimizers.optimizer import _generate_noise

    def noise_only() -> None:  # what DPOptimizer draws per step (secure mode: 4 draws a coordinate)
        for p in model.parameters():
            if p.requires_grad:
                _generate_noise(std=1.0, reference=p, generator=None, secure_mode=True)

    plain = timed(plain_step)
    dp_time = timed(dp_step)
    noise = timed(noise_only)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "groups": k, "trainable": trainable, "engine": engine, "trainable_params": trainable_params,
            "plain_ms": plain * 1e3, "dp_ms": dp_time * 1e3, "ratio": dp_time / plain,
            "noise_ms": noise * 1e3, "ratio_without_noise": (dp_time - noise) / plain,
            "group_grads_MiB": k * trainable_params * 4 / 2**20, "peak_MiB": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ks", default="1,4,16,64,128", help="group counts K (micro-batches)")
    parser.add_argument("--trainable", default="all,last-1,projections")
    parser.add_argument("--engines", default="hooks,vmap")
    parser.add_argument("--vmap-max-k", type=int, default=16, help="largest K run with the vmap reference (it is slow)")
    parser.add_argument("--units", type=int, default=32, help="units in the per-unit rows (pairs/units pairs each)")
    parser.add_argument("--csv", default="", help="also write the table here")
    parser.add_argument("--one", nargs=4, metavar=("K", "TRAINABLE", "ENGINE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.one[2], args.one[3], args.pairs, args.repeats, args.device)))
        return 0
    plan = []
    for trainable in args.trainable.split(","):
        for engine in args.engines.split(","):
            plan += [(k, trainable, engine, "microbatch") for k in map(int, args.ks.split(","))
                     if engine != "vmap" or k <= args.vmap_max_k]
            plan.append((args.units, trainable, engine, "unit"))
    rows = []
    for i, (k, trainable, engine, mode) in enumerate(plan, 1):
        cmd = [sys.executable, "-m", "benchmarks.dp_step", "--one", str(k), trainable, engine, mode,
               "--pairs", str(args.pairs), "--repeats", str(args.repeats), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        rows.append(r)
        print(f"[{i}/{len(plan)}] {mode:<10} K={k:>3} {trainable:<11} {engine:<5} plain {r['plain_ms']:7.1f} ms  "
              f"dp {r['dp_ms']:7.1f} ms  ratio {r['ratio']:.2f}x (noise {r['noise_ms']:.0f} ms)  peak {r['peak_MiB']:.0f} MiB", flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(f"\n{args.pairs} pairs per step, device {args.device}, torch {torch.__version__}, median of {args.repeats}")
    print(table.to_markdown(index=False, floatfmt=".2f") if _has_tabulate() else table.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
