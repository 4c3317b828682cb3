"""The auditor's role: attack a run's saved global models with the auditor's own targets.

In a consortium the server holds no patient data, so it cannot run IDIA: the attack needs the
names and other photos of target people, some of whom trained at a hospital (members) and some
not. An auditor who holds them (consenting targets, or canaries the consortium planted) runs

    fedclip audit RUN_DIR --targets targets.csv [--checkpoint base.pt]

against every round's global model the server saved under ``RUN_DIR/models/`` (models the server
publishes anyway). The run's own IDIA settings are used; the results land in ``RUN_DIR/audit/``
as the same tables a simulation writes, beside the accountant's epsilon from ``rounds.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedclip.attacks.canary import CanaryAudit
from fedclip.attacks.metrics import attack_tables, score_rows
from fedclip.attacks.one_run import run_confidences
from fedclip.attacks.suite import target_attacks
from fedclip.data.canaries import load_canaries
from fedclip.data.manifest import load_manifest
from fedclip.models.arrays import load_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.guarantee import guarantee_of
from fedclip.reporting.plots import plot_attack, plot_roc
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.summary import ATTACK_HEADER, AUDIT_TEXT, attack_rows, contradictions
from simulations.hospital_clip.config import SimulationConfig

ATTACK_KEYS = (
    "idia-queries",
    "idia-tau",
    "idia-templates",
    "idia-distractors",
    "seed",
    "name-lists",
    "lira",
    "lira-records",
)


def _attack_config(config: dict) -> SimulationConfig:
    """The run's attack settings, parsed and validated as the run parsed them (no other key is read:
    the run's data paths need not exist on the auditor's machine)."""
    return SimulationConfig.from_run_config({k: config[k] for k in ATTACK_KEYS if k in config})


def accounted_epsilons(run_dir: Path) -> dict[int, float]:
    """The largest site epsilon after each round, from the server's ``rounds.csv`` (0 before round 1)."""
    path = run_dir / "rounds.csv"
    rounds = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["round", "epsilon"])
    out = {0: 0.0}
    for r in sorted(rounds["round"].unique()):
        out[int(r)] = float(rounds.loc[rounds["round"] <= r, "epsilon"].max())
    return out


def audit_run(
    run_dir: str | Path,
    *,
    targets: str | Path | None,
    checkpoint: str = "",
    out_dir: str | Path | None = None,
    allow_outside_paths: bool = False,
    canaries: str | Path | None = None,
) -> Path:
    """Attack every saved round model of ``run_dir`` with IDIA on ``targets`` and/or the canary audit
    on ``canaries`` (the auditor's canary file); write tables, plot and summary."""
    if not targets and not canaries:
        raise ValueError("audit: give --targets (IDIA) or --canaries (the one-run canary audit), or both")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"run: {run_dir} has no config.json; expected the output folder of a fedclip run")
    config = json.loads(config_path.read_text())
    models = sorted((run_dir / "models").glob("round_*.pt"))
    if not models:
        raise ValueError(f"run: {run_dir / 'models'} holds no saved round models (round_NNN.pt)")
    base = checkpoint or str(config.get("resolved-checkpoint", ""))
    if base and not Path(base).is_file():
        raise ValueError(
            f"checkpoint: the run's base weights {base} are not on this machine; pass the copy you hold "
            "with --checkpoint (the hospitals' base checkpoint)"
        )
    bundle = create_model(ModelConfig(arch=str(config["arch"]), pretrained=base, trainable=str(config["trainable"])))
    settings = _attack_config(config)
    idia = settings.idia()
    attacks: list = []
    if targets:  # references of the likelihood-ratio attacks: the base model, before any round is loaded
        frame = load_manifest(targets, allow_outside_paths=allow_outside_paths).frame
        attacks += target_attacks(
            frame,
            idia=idia,
            lira_records=settings.lira_records if settings.lira else 0,
            reference=bundle.model,
            preprocess=bundle.preprocess,
            tokenizer=bundle.tokenizer,
        )
    if canaries:  # its reference is the base model, before any round is loaded
        attacks.append(
            CanaryAudit(
                load_canaries(canaries),
                reference=bundle.model,
                preprocess=bundle.preprocess,
                tokenizer=bundle.tokenizer,
            )
        )
    out = Path(out_dir) if out_dir else run_dir / "audit"
    files = RunFiles(out)
    for table in ("attack", "attack_sites", "attack_scores"):  # derived files: an audit run again replaces them
        files.path(table).unlink(missing_ok=True)
    epsilons = accounted_epsilons(run_dir)
    # Bonferroni over the rounds audited (and, for certified bounds, over the randomised audits): jointly 95%
    confidence, audit_confidence = run_confidences(rounds=len(models), attacks=attacks)
    delta = float(config["delta"])
    comparable = guarantee_of(
        mode=str(config["dp-mode"]),
        privacy_unit=str(config["privacy-unit"]),
        microbatch_size=int(config.get("microbatch-size", 1)),
    ).membership
    for k, path in enumerate(models, 1):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        round_ = int(saved["round"])
        load_arrays(bundle.model, ArrayRecord(torch_state_dict=saved["state_dict"]))
        for attack in attacks:
            decisions = attack(bundle.model)
            row, sites = attack_tables(
                decisions,
                round_=round_,
                max_site_epsilon=epsilons.get(round_, float("nan")),
                delta=delta,
                confidence=audit_confidence if decisions.randomised else confidence,
            )
            row["comparable_to_epsilon"] = comparable
            files.append("attack", [row])
            files.append("attack_sites", sites)
            files.append("attack_scores", score_rows(decisions, round_=round_))
            print(
                f"[{k}/{len(models)}] round {round_}: {attack.name} TPR {row['tpr']:.3f} FPR {row['fpr']:.3f} "
                f"AUC {row['auc']:.2f} eps_lb {row['epsilon_lower_bound']:.2f} audited {row['audited_epsilon']:.2f} "
                f"| accountant's max site epsilon {row['max_site_epsilon']:.2f}",
                flush=True,
            )
    table = files.read("attack")
    plot_attack(out, table)
    plot_roc(out, files.read("attack_scores"))
    lines = ["# fedclip audit", "", f"- run: `{run_dir.resolve()}`"]
    if targets:
        idia_targets = attacks[0].targets
        lines += [
            f"- IDIA targets: `{Path(targets).resolve()}` ({int(idia_targets.is_member.sum())} members, "
            f"{int((~idia_targets.is_member).sum())} non-members); {idia.num_queries} query images per person, "
            f"tau {idia.tau}, {len(idia.templates)} templates, {idia.num_distractors} distractor names"
        ]
    if canaries:
        lines += [
            f"- canaries: `{Path(canaries).resolve()}` ({len(attacks[-1].ids)} canary patients, each "
            "trained with probability 1/2)"
        ]
    lines += [
        "",
        *ATTACK_HEADER,
        *attack_rows(table),
        *contradictions(table),
        "",
        f"Bounds are jointly 95% over the {len(models)} rounds audited. {AUDIT_TEXT}",
        "",
        "Tables: `attack.csv`, `attack_sites.csv`, `attack_scores.csv`. Plots: `attack.png`, `roc.png`.",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    return out
