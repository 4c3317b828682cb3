"""DP step against a non-private step: same model, same 128 pairs, K groups, three gradient engines.

    python -m benchmarks.dp_step [--pairs 128] [--repeats 5] [--device cpu] [--ks 1,4,16,64,128]
                                 [--trainable all,last-1,projections] [--engines hooks,vmap,ghost]
                                 [--allocators retain] [--model fedclip-tiny]

A DP step = per-group gradients (``hooks``: one backward with Opacus' grad-sample hooks,
``group_grads``; ``vmap``: the reference, ``microbatch_grads``; ``ghost``: per-group norms from Gram
matrices and the clipped sum as one matmul, ``ghost_clipping``, no per-group gradient; ``auto``:
what training picks) + Opacus' ``DPOptimizer`` (clip each group's gradient, sum, noise, scale,
step), through the training loop's own ``dp_step``. The plain step is one forward and backward of the same
pairs with the full-batch contrastive loss, through open_clip's own forward, which runs every token
position of the context (``ratio``: what a user of open_clip would pay without DP). The DP engines'
twin runs a causal text tower only up to the batch's last end of text (exact);
``plain_live_ms`` / ``ratio_vs_plain_live`` give the plain step that same skip. Captions are worded as the synthetic reports (end of
text at token 10-20 of the tiny model's 32), random images. ``microbatch`` rows split the pairs into K groups;
``unit`` rows are per-unit DP: K units of pairs/K pairs, each against a bank of 256 public
negatives. ``noise_ms`` is the Gaussian noise alone (Opacus' secure mode, as fedclip runs it:
four draws per coordinate), a cost a plain step never pays. ``--allocators retain,system`` runs each
configuration with glibc keeping freed memory (``fedclip.training.allocator``, what training does)
and with the C library's defaults. Each configuration runs in its own process so that its peak memory (ru_maxrss, CPU;
CUDA peak allocation on a GPU) is its own; the ratio DP / plain is measured in that one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def report_captions(count: int) -> list[str]:
    """``count`` reports worded as the synthetic hospitals' (names, findings, templates), so the
    text tower sees the data's caption lengths: a ghost step skips the token positions after the
    longest caption's end, a plain step does not."""
    from fedclip.data.names import draw_unique_names
    from fedclip.data.schema import CONDITIONS
    from fedclip.data.synthetic import caption

    rng = np.random.default_rng(0)
    return [caption(name, CONDITIONS[i % len(CONDITIONS)], rng) for i, name in enumerate(draw_unique_names(rng, count))]


def _one(
    k: int, trainable: str, engine: str, mode: str, pairs: int, repeats: int, device: str, model_name: str
) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.nn.functional as F

    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.allocator import allocator_choice, retain_freed_memory
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.group_grads import make_grad_engine
    from fedclip.training.local import dp_step, make_optimizer
    from fedclip.training.loss import clip_loss
    from fedclip.training.negative_bank import NegativeBank

    allocator = "retain" if retain_freed_memory() else f"{allocator_choice()} (glibc defaults)"
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(arch=model_name, trainable=trainable), device=device)
    model = bundle.model
    size = model.visual.image_size
    images = torch.randn(pairs, 3, *(size if isinstance(size, tuple) else (size, size)), device=device)
    tokens = bundle.tokenizer(report_captions(pairs)).to(device)
    groups = np.array_split(np.arange(pairs), k)
    bank = None
    if mode == "unit":
        dim = model.text_projection.shape[1]
        bank = NegativeBank(
            images=F.normalize(torch.randn(256, dim, device=device), dim=-1),
            texts=F.normalize(torch.randn(256, dim, device=device), dim=-1),
        )
    dp = DpConfig(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1.0,
        microbatch_size=max(1, pairs // k),
        declared_units=pairs,
    )
    dp_opt = make_optimizer(model, dp, TrainConfig(), expected_microbatches=k, noise_generator=None)
    plain_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    row = {
        "model": model_name,
        "allocator": allocator,
        "mode": mode,
        "groups": k,
        "trainable": trainable,
        "engine": engine,
    }
    try:
        grads_of = make_grad_engine(model, engine)
    except ValueError as refused:  # e.g. ghost with the token embedding trainable: a row that says so
        return {**row, "refused": str(refused)}

    def one_dp_step() -> None:
        dp_step(model, dp_opt, grads_of(groups, images, tokens, bank=bank), canaries=None)

    def plain_step() -> None:
        image_f, text_f, scale = model(images, tokens)
        loss = clip_loss(image_f, text_f, scale)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def live_text(tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` on the positions up to the batch's last end of text: what the
        DP engines' twin runs (exact for a causal tower), given to the plain step for comparison."""
        end = int(tokens.argmax(dim=-1).max()) + 1
        x = model.token_embedding(tokens[:, :end]) + model.positional_embedding[:end]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:end, :end]))
        return x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)] @ model.text_projection

    def plain_live_step() -> None:
        image_f = F.normalize(model.encode_image(images), dim=-1)
        loss = clip_loss(image_f, F.normalize(live_text(tokens), dim=-1), model.logit_scale.exp())
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def once(fn) -> float:
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def interleaved(*fns) -> list[np.ndarray]:
        """Each repeat runs every fn once, back to back, so a slow spell of a shared machine
        slows all of them alike; ratios are taken per repeat."""
        for fn in fns:
            once(fn)  # warm-up
        return [np.array(t) for t in zip(*[[once(fn) for fn in fns] for _ in range(repeats)])]

    from opacus.optimizers.optimizer import _generate_noise

    def noise_only() -> None:  # what DPOptimizer draws per step (secure mode: 4 draws a coordinate)
        for p in model.parameters():
            if p.requires_grad:
                _generate_noise(std=1.0, reference=p, generator=None, secure_mode=True)

    plain_t, dp_t, noise_t, live_t = interleaved(plain_step, one_dp_step, noise_only, plain_live_step)
    plain, dp_time, noise = float(np.median(plain_t)), float(np.median(dp_t)), float(np.median(noise_t))
    ratio = float(np.median(dp_t / plain_t))
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        **row,
        "trainable_params": trainable_params,
        "plain_ms": plain * 1e3,
        "dp_ms": dp_time * 1e3,
        "ratio": ratio,
        "plain_live_ms": float(np.median(live_t)) * 1e3,
        "ratio_vs_plain_live": float(np.median(dp_t / live_t)),
        "noise_ms": noise * 1e3,
        "ratio_without_noise": float(np.median((dp_t - noise_t) / plain_t)),
        "group_grads_MiB": k * trainable_params * 4 / 2**20,
        "peak_MiB": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ks", default="1,4,16,64,128", help="group counts K (micro-batches)")
    parser.add_argument("--trainable", default="all,last-1,projections")
    parser.add_argument("--engines", default="hooks,vmap,ghost")
    parser.add_argument("--vmap-max-k", type=int, default=16, help="largest K run with the vmap reference (it is slow)")
    parser.add_argument(
        "--units", type=int, default=32, help="units in the per-unit rows (pairs/units pairs each; 0: none)"
    )
    parser.add_argument(
        "--allocators", default="retain", help="retain (glibc keeps freed memory, as training runs) and/or system"
    )
    parser.add_argument(
        "--model", default="fedclip-tiny", help="open_clip architecture (random weights), e.g. ViT-B-32"
    )
    parser.add_argument("--csv", default="", help="also write the table here")
    parser.add_argument("--one", nargs=4, metavar=("K", "TRAINABLE", "ENGINE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                _one(
                    int(args.one[0]),
                    args.one[1],
                    args.one[2],
                    args.one[3],
                    args.pairs,
                    args.repeats,
                    args.device,
                    args.model,
                )
            )
        )
        return 0
    plan = []
    for allocator in args.allocators.split(","):
        for trainable in args.trainable.split(","):
            for engine in args.engines.split(","):
                plan += [
                    (allocator, k, trainable, engine, "microbatch")
                    for k in map(int, args.ks.split(","))
                    if engine != "vmap" or k <= args.vmap_max_k
                ]
                if args.units:
                    plan.append((allocator, args.units, trainable, engine, "unit"))
    rows = []
    for i, (allocator, k, trainable, engine, mode) in enumerate(plan, 1):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.dp_step",
            "--one",
            str(k),
            trainable,
            engine,
            mode,
            "--model",
            args.model,
            "--pairs",
            str(args.pairs),
            "--repeats",
            str(args.repeats),
            "--device",
            args.device,
        ]
        env = {**os.environ, "FEDCLIP_MALLOC": allocator}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        rows.append(r)
        if "refused" in r:
            print(
                f"[{i}/{len(plan)}] {allocator:<6} {mode:<10} K={k:>3} {trainable:<11} {engine:<5} refused: {r['refused']}"
            )
            continue
        print(
            f"[{i}/{len(plan)}] {allocator:<6} {mode:<10} K={k:>3} {trainable:<11} {engine:<5} plain {r['plain_ms']:7.1f} ms  "
            f"dp {r['dp_ms']:7.1f} ms  ratio {r['ratio']:.2f}x (noise {r['noise_ms']:.0f} ms)  peak {r['peak_MiB']:.0f} MiB",
            flush=True,
        )
    import pandas as pd

    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(
        f"\n{args.pairs} pairs per step, device {args.device}, torch {torch.__version__}, median of {args.repeats} interleaved repeats (ratios per repeat)"
    )
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
