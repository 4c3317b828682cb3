"""The ``fedclip`` command's library half: data, warm start, evaluation, canaries, privatization,
status and spending. The commands that drive the Flower apps (``compare``, ``audit``,
``site-worker``) are registered by ``simulations.commands``, the installed entry point, so that
the library never imports the apps.

    fedclip prepare [--out runs/default]   generate the data, warm-start, evaluate, write a table
    fedclip data --out DIR [--seed N]      only generate the synthetic data set
    fedclip warmstart --manifest FILE      only pretrain (or find the cached checkpoint)
    fedclip canaries OUT --sites a,b       the auditor: canary patients for a consortium's own data
    fedclip privatize --manifest M --out D CADP / MaskDP: privatize the training images once (input level)
    fedclip gallery --manifest M --out P  a picture of CADP / MaskDP / mask-replace on public images
    fedclip check-manifest FILE            a manifest loads and every image reads: rows per split and site
    fedclip status RUN_DIR                 a run's status; exit 0 finished, 1 failed, 3 running or unknown
    fedclip spending STATE_DIR             a site's own privacy spending, from its own ledger
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedclip.console import quiet_known_noise
from fedclip.data.manifest import load_manifest
from fedclip.data.names import NAME_LISTS
from fedclip.data.schema import Split
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.data.tensors import load_images, load_pairs
from fedclip.evaluation.retrieval import retrieval_recall
from fedclip.evaluation.zero_shot import zero_shot_accuracy
from fedclip.models.factory import ModelConfig, create_model
from fedclip.progress import decide_progress
from fedclip.training.warmstart import WarmStartConfig, warm_start


def _print_epoch(epoch: int, loss: float) -> None:
    print(f"  warm start epoch {epoch}: loss {loss:.3f}", flush=True)


def evaluate_checkpoints(manifest: Path, checkpoints: dict[str, str]) -> pd.DataFrame:
    """Zero-shot accuracy and retrieval recall on the held-out split, one row per checkpoint."""
    rows = []
    frame = load_manifest(manifest).rows(Split.HELDOUT)
    for label, path in checkpoints.items():
        bundle = create_model(ModelConfig(pretrained=path))
        data = load_pairs(frame, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
        rows.append(
            {
                "model": label,
                "zero_shot_accuracy": zero_shot_accuracy(bundle.model, bundle.tokenizer, data),
                **retrieval_recall(bundle.model, data),
                "heldout_images": len(data),
            }
        )
    return pd.DataFrame(rows)


def _synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        seed=args.seed,
        num_sites=args.num_sites,
        patients_per_site=args.patients_per_site,
        public_patients=args.public_patients,
        heldout_patients=args.heldout_patients,
        site_skew=args.site_skew,
        name_lists=args.name_lists,
        identity_region=args.identity_region,
        identity_strength=args.identity_strength,
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    d = SyntheticConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-sites", type=int, default=d.num_sites)
    p.add_argument("--patients-per-site", type=int, default=d.patients_per_site)
    p.add_argument("--public-patients", type=int, default=d.public_patients)
    p.add_argument("--heldout-patients", type=int, default=d.heldout_patients)
    p.add_argument("--site-skew", type=float, default=d.site_skew, help="Dirichlet concentration; 0 = balanced")
    p.add_argument(
        "--identity-region",
        type=float,
        default=d.identity_region,
        help="< 1: each look fills a patch of this share of the side, and every image gets a mask (MaskDP)",
    )
    p.add_argument(
        "--name-lists",
        choices=NAME_LISTS,
        default=d.name_lists,
        help="name lists of the patients: census gives most patients their own surname (names leak more)",
    )
    p.add_argument(
        "--identity-strength",
        type=float,
        default=d.identity_strength,
        help="weight of a patient's look in their images, in (0, 2]: higher, faces easier to tell apart",
    )


def cmd_data(args: argparse.Namespace) -> int:
    manifest = generate(args.out, _synthetic_config(args))
    print(f"wrote {manifest}")
    return 0


def cmd_warmstart(args: argparse.Namespace) -> int:
    path = warm_start(
        args.manifest, cache_dir=args.cache_dir, config=WarmStartConfig(epochs=args.epochs), progress=_print_epoch
    )
    print(f"warm-start checkpoint: {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    print(f"[1/3] generating synthetic hospitals under {out / 'data'}", flush=True)
    manifest = generate(out / "data", _synthetic_config(args))
    print("[2/3] warm start on the public population (cached after the first run)", flush=True)
    ckpt = warm_start(
        manifest,
        cache_dir=out / "cache",
        config=WarmStartConfig(epochs=args.epochs, seed=args.seed),
        progress=_print_epoch,
    )
    print("[3/3] evaluating on held-out patients", flush=True)
    table = evaluate_checkpoints(manifest, {"random init": "", "warm start": str(ckpt)})
    table.to_csv(out / "warmstart_eval.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"checkpoint: {ckpt}\ntable: {out / 'warmstart_eval.csv'}")
    return 0


def cmd_canaries(args: argparse.Namespace) -> int:
    from fedclip.data.canary_maker import SITE_ROWS, make_site_canaries

    path = make_site_canaries(
        args.out,
        sites=args.sites.split(","),
        count=args.count,
        images_per_canary=args.images_per_canary,
        query_images=args.query_images,
        image_size=args.image_size,
        name_lists=args.name_lists,
        exclude_manifest=args.exclude,
    )
    print(f"the auditor's canary file (keep it, and {path.name}.secret, from the hospitals and the server): {path}")
    for site in sorted((path.parent / "sites").iterdir()):
        rows = len(pd.read_csv(site / SITE_ROWS))
        print(f"{site.name}: copy {site}/ next to its manifest and append {SITE_ROWS} ({rows} training rows)")
    return 0


def _train_public_inn(manifest: str, out: Path, *, image_size: int, epochs: int, allow_outside_paths: bool):
    """An INN fitted to the manifest's public rows only: one fitted to private images would carry
    them past the noise."""
    import torch

    from fedclip.privatize.inn import ConditionalInn, InnConfig, save_inn, train_inn
    from fedclip.privatize.pixels import to_pixels

    frame = load_manifest(manifest, allow_outside_paths=allow_outside_paths).frame
    public = frame[frame["split"] == str(Split.PUBLIC)]
    if public.empty:
        raise ValueError(f"manifest: {manifest} has no 'public' rows to train the INN on; pass --inn")
    inn = ConditionalInn(InnConfig(image_size=image_size))
    images = load_images(public, preprocess=to_pixels(image_size))
    print(f"training the INN on {len(public)} public images ({epochs} epochs)", flush=True)
    train_inn(
        inn,
        images,
        inn.config.label_indices(public["condition"]),
        epochs=epochs,
        generator=torch.Generator().manual_seed(0),
        progress=lambda e, b: print(f"  epoch {e}/{epochs}: {b:.3f} bits/dim", flush=True),
    )
    save_inn(inn, out / "inn.pt")
    return inn


def _public_images(manifest: str, *, image_size: int, allow_outside_paths: bool):
    from fedclip.privatize.pixels import to_pixels

    frame = load_manifest(manifest, allow_outside_paths=allow_outside_paths).frame
    return load_images(frame[frame["split"] == str(Split.PUBLIC)], preprocess=to_pixels(image_size))


def cmd_privatize(args: argparse.Namespace) -> int:
    from fedclip.privatize.cadp import CadpConfig, CadpPrivatizer
    from fedclip.privatize.dataset import PRIVATIZATION_FILE, privatize_manifest
    from fedclip.privatize.inn import load_inn
    from fedclip.privatize.maskdp import MaskDpConfig, MaskPrivatizer

    out = Path(args.out)
    if args.method == "cadp":
        config = CadpConfig(
            target_epsilon=args.epsilon,
            delta=args.delta,
            mechanism=args.mechanism,
            radius=args.radius,
            label=args.label,
            label_epsilon=args.label_epsilon,
        )
        inn = (
            load_inn(args.inn)
            if args.inn
            else _train_public_inn(
                args.manifest,
                out,
                image_size=args.image_size,
                epochs=args.inn_epochs,
                allow_outside_paths=args.allow_outside_paths,
            )
        )
        privatizer, size = CadpPrivatizer(inn, config), inn.config.image_size
    else:
        replace = args.method == "mask-replace"
        config = MaskDpConfig(
            method="replace" if replace else "noise",
            target_epsilon=0.0 if replace else args.epsilon,
            delta=args.delta,
            mechanism=args.mechanism,
            radius=args.radius or 1.0,
        )
        stand_ins = (
            _public_images(args.manifest, image_size=args.image_size, allow_outside_paths=args.allow_outside_paths)
            if replace
            else None
        )
        privatizer, size = MaskPrivatizer(config, stand_ins=stand_ins), args.image_size
    path = privatize_manifest(
        args.manifest,
        out,
        privatizer=privatizer,
        image_size=size,
        privacy_unit=args.privacy_unit,
        allow_outside_paths=args.allow_outside_paths,
    )
    report = json.loads((out / PRIVATIZATION_FILE).read_text())
    eps = "no epsilon" if report["epsilon"] is None else f"epsilon {report['epsilon']:.3f}, delta {report['delta']:g}"
    print(
        f"{report['method']}: privatized {report['images']} training images; {eps} per {report['privacy_unit']} "
        f"({report['images_per_unit']} images). {report['statement']}"
    )
    print(f"manifest: {path}\npictures: {out / 'privatization.png'}")
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from fedclip.privatize.gallery import render_gallery
    from fedclip.privatize.inn import load_inn

    out = Path(args.out)
    inn = (
        load_inn(args.inn)
        if args.inn
        else _train_public_inn(
            args.manifest,
            out.parent,
            image_size=args.image_size,
            epochs=args.inn_epochs,
            allow_outside_paths=args.allow_outside_paths,
        )
    )
    path = render_gallery(
        args.manifest,
        out,
        inn=inn,
        epsilon=args.epsilon,
        images_per_unit=args.images_per_unit,
        delta=args.delta,
        allow_outside_paths=args.allow_outside_paths,
    )
    print(f"gallery: {path}")
    return 0


STATUS_EXIT = {"finished": 0, "failed": 1}


def cmd_status(args: argparse.Namespace) -> int:
    """Exit codes a script can branch on (``flwr run --stream`` exits 0 even when the ServerApp fails)."""
    path = Path(args.run_dir) / "status.json"
    if not path.is_file():
        print(
            f"fedclip: {path}: no status (the run has not started here, or this is not a run folder)", file=sys.stderr
        )
        return 3
    status = json.loads(path.read_text())
    print(json.dumps(status, indent=2, sort_keys=True))
    return STATUS_EXIT.get(status.get("status"), 3)


def cmd_check_manifest(args: argparse.Namespace) -> int:
    """Every check a run makes of a party's manifest, before the run: a bad row is named (ValueError)."""
    frame = load_manifest(args.manifest, allow_outside_paths=args.allow_outside_paths).frame
    counts = frame.groupby(["split", "site"]).agg(rows=("filepath", "size"), patients=("patient_id", "nunique"))
    print(counts.to_string())
    print(f"{args.manifest}: {len(frame)} rows, every image readable")
    return 0


def cmd_spending(args: argparse.Namespace) -> int:
    from fedclip.privacy.ledger_store import LedgerStore
    from fedclip.reporting.spending import write_spending

    ledger = Path(args.state_dir) / "ledger.sqlite"
    if not ledger.is_file():
        raise ValueError(f"state-dir: no ledger at {ledger}; pass the state-dir of the site's node config")
    store = LedgerStore(ledger, delta=args.delta, accountant=args.accountant, create=False)
    try:
        print(write_spending(store, args.state_dir).read_text())
    finally:
        store.close()
    return 0


def _data_commands(sub) -> None:
    """prepare, data, warmstart: the embedded default's data and base model."""
    p = sub.add_parser("prepare", help="generate data, warm-start and evaluate the embedded default")
    p.add_argument("--out", default="runs/default")
    _add_data_options(p)
    p.add_argument("--epochs", type=int, default=WarmStartConfig.epochs)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("data", help="generate the synthetic multi-hospital data set")
    p.add_argument("--out", required=True)
    _add_data_options(p)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("warmstart", help="pretrain the tiny model on a manifest's public rows")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--epochs", type=int, default=WarmStartConfig.epochs)
    p.set_defaults(func=cmd_warmstart)


def _auditor_commands(sub) -> None:
    """canaries: the auditor's canary patients for a consortium's own data."""
    p = sub.add_parser("canaries", help="the auditor: canary patients for a consortium's own data, one share per site")
    p.add_argument("out", help="new folder for the auditor's canaries.csv and each site's share")
    p.add_argument("--sites", required=True, help="comma-separated site names, as in the run's `sites`")
    p.add_argument("--count", type=int, default=64, help="canary patients (each trains with probability 1/2)")
    p.add_argument("--images-per-canary", type=int, default=4, help="training images per canary")
    p.add_argument("--query-images", type=int, default=3, help="further images per canary, never trained on")
    p.add_argument("--image-size", type=int, default=224, help="pixels per side of the rendered images")
    p.add_argument(
        "--name-lists", default="census", choices=sorted(NAME_LISTS), help="lists canary names are drawn from"
    )
    p.add_argument("--exclude", default=None, help="a manifest whose names no canary may take (the auditor's targets)")
    p.set_defaults(func=cmd_canaries)


def _input_commands(sub) -> None:
    """privatize, gallery: input-level privatization (CADP, MaskDP)."""
    p = sub.add_parser("privatize", help="CADP or MaskDP: privatize a manifest's training images once (input level)")
    p.add_argument("--manifest", required=True, help="the manifest whose 'train' rows are privatized")
    p.add_argument("--out", required=True, help="new folder: manifest.csv, images/, privatization.json/.png, inn.pt")
    p.add_argument(
        "--method",
        default="cadp",
        choices=["cadp", "maskdp", "mask-replace"],
        help="cadp: the whole image through the INN's latent; maskdp: noise inside each row's mask; "
        "mask-replace: a public stand-in inside the mask (anonymization, no epsilon)",
    )
    p.add_argument("--epsilon", type=float, default=0.0, help="per privacy unit (all its images), label included")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--privacy-unit", default="identity", choices=["identity", "record"])
    p.add_argument("--mechanism", default="gaussian", choices=["gaussian", "laplace"])
    p.add_argument(
        "--radius",
        type=float,
        default=0.0,
        help="clipping radius s of each image's latent or masked region (0: cadp 1 / noise multiplier, maskdp 1)",
    )
    p.add_argument(
        "--label",
        default="none",
        choices=["none", "rr"],
        help="decode without a label, or with one released by randomized response",
    )
    p.add_argument("--label-epsilon", type=float, default=0.0, help="per image, with --label rr")
    p.add_argument("--inn", default=None, help="a trained INN (default: train one on the manifest's public rows)")
    p.add_argument("--inn-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32, help="the INN's image size (images are resized to it)")
    p.add_argument("--allow-outside-paths", action="store_true")
    p.set_defaults(func=cmd_privatize)
    p = sub.add_parser("gallery", help="a picture of CADP, MaskDP and mask-replace on a manifest's public images")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--epsilon", type=float, default=8.0, help="per patient of --images-per-unit images")
    p.add_argument("--images-per-unit", type=int, default=10)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--inn", default=None, help="a trained INN (default: train one on the public rows)")
    p.add_argument("--inn-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--allow-outside-paths", action="store_true")
    p.set_defaults(func=cmd_gallery)


def _site_commands(sub) -> None:
    """status, spending: what a run and a site's ledger say."""
    p = sub.add_parser("status", help="a run's status.json; exit 0 finished, 1 failed, 3 running or unknown")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("check-manifest", help="a manifest loads and every image reads (each party, before a run)")
    p.add_argument("manifest")
    p.add_argument("--allow-outside-paths", action="store_true", help="image paths may leave the manifest's folder")
    p.set_defaults(func=cmd_check_manifest)
    p = sub.add_parser("spending", help="a site's privacy spending from its own ledger (writes spending.csv/.md)")
    p.add_argument("state_dir", help="the site's state-dir (node config), holding ledger.sqlite")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="prv")
    p.set_defaults(func=cmd_spending)


def build_parser(
    extra: Sequence[Callable[[Any], None]] = (), description: str | None = None
) -> argparse.ArgumentParser:
    """The library's commands, and those ``extra`` registers (the apps', ``simulations.commands``)."""
    parser = argparse.ArgumentParser(
        prog="fedclip", description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (_data_commands, *extra, _auditor_commands, _input_commands, _site_commands):
        register(sub)
    return parser


def main(
    argv: list[str] | None = None, *, extra: Sequence[Callable[[Any], None]] = (), description: str | None = None
) -> int:
    """``fedclip``: the installed command is ``simulations.commands.main``, which adds the apps' commands."""
    args = build_parser(extra, description).parse_args(argv)
    quiet_known_noise()
    try:
        decide_progress()
        return args.func(args)
    except ValueError as exc:
        print(f"fedclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
