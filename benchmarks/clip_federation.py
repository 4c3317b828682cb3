"""A federation at CLIP size on this machine: two sites, two rounds of ``arch`` (ViT-B-32 by
default, 224 px), one run per trainable set, through ``flower-simulation`` as a user runs it.

    python -m benchmarks.clip_federation [--model ViT-B-32] [--trainable lora-8,bias,last-1]
        [--rounds 2] [--patients 8] [--local-steps 2] [--device cpu] [--out runs/bench/clip_federation]

The base weights are a random initialisation of the architecture written to a checkpoint file
(``pretrained = file``: the path a user with real weights takes; nothing is downloaded). Printed
per trainable set: seconds per round of the sites' training (``train_phase_seconds`` of
``timings.csv``: a round's messages out, every site's DP training, replies back), of the server's
aggregation and of its evaluation (zero-shot and IDIA on the global model), the reply bytes per
site and round, and the run's wall time. ``--device cuda`` asks Ray for a GPU per site
(``backend.client-resources.num-gpus``); not measured here (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def base_checkpoint(model_name: str, out: Path) -> Path:
    from fedclip.models.factory import ModelConfig, create_model, save_checkpoint

    path = out / f"{model_name}-random.pt"
    if not path.is_file():
        save_checkpoint(create_model(ModelConfig(arch=model_name)).model, path)
    return path


def run_config(model_name: str, trainable: str, checkpoint: Path, args, folder: Path) -> str:
    keys = {
        "arch": model_name,
        "pretrained": str(checkpoint),
        "trainable": trainable,
        "num-sites": 2,
        "patients-per-site": args.patients,
        "public-patients": 16,
        "heldout-patients": 8,
        "images-per-patient": 4,
        "query-images-per-patient": 2,
        "idia-queries": 2,
        "idia-distractors": 16,
        "lira": False,
        "num-rounds": args.rounds,
        "local-steps": args.local_steps,
        "microbatch-size": 2,
        "sample-rate": 0.5,
        "target-epsilon": 8.0,
        "budget": 100.0,
        "output-dir": str(folder),
        "cache-dir": str(folder.parent / "cache"),
    }
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in keys.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--trainable", default="lora-8,bias,last-1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="runs/bench/clip_federation")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from benchmarks.reply_bytes import measure

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = base_checkpoint(args.model, out)
    trainable_sets = args.trainable.split(",")
    sizes = measure(args.model, trainable_sets).set_index("trainable")
    rows = []
    for trainable in trainable_sets:
        folder = out / trainable
        cmd = [
            str(Path(sys.executable).parent / "flower-simulation"),
            "--app",
            "simulations.hospital_clip",
            "--run-config",
            run_config(args.model, trainable, checkpoint, args, folder),
        ]
        if args.device == "cuda":
            cmd += ["--backend-config", json.dumps({"client-resources": {"num-cpus": 1, "num-gpus": 1}})]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{trainable}: the run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        timings = pd.read_csv(folder / "timings.csv")
        trained = timings[timings["round"] >= 1]
        rows.append(
            {
                "model": args.model,
                "trainable": trainable,
                "train_s_per_round": trained["train_phase_seconds"].mean(),
                "aggregate_s_per_round": trained["strategy_seconds"].mean(),
                "evaluate_s_per_round": trained["evaluate_seconds"].mean(),
                "reply_MB": sizes.loc[trainable, "reply_MB"],
                "wall_s": wall,
            }
        )
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    print(f"\n{args.model}, 2 sites of {args.patients} patients, {args.rounds} rounds of {args.local_steps} DP steps")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
