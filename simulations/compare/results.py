"""Read a comparison's runs back into tables (CSV, Markdown) and plots (PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fedclip.attacks.metrics import certified_bounds  # noqa: E402
from fedclip.distributed.adversaries import ADVERSARIES  # noqa: E402
from fedclip.privacy.ledger import PrivacyLedger  # noqa: E402
from fedclip.privacy.ledger_store import LedgerStore  # noqa: E402
from simulations.compare.runner import RunSpec  # noqa: E402
from simulations.compare.settings import SETTINGS, Setting  # noqa: E402
from simulations.hospital_clip.task import POOLED_SITE  # noqa: E402

METRICS = (
    "zero_shot_accuracy",
    "recall_at_1",
    "tpr",
    "fpr",
    "epsilon_lower_bound",
    "replies_tpr",
    "replies_fpr",
    "idia_auc",
    "idia_tpr_at_1pct_fpr",
    "lira_patient_tpr_at_1pct_fpr",
    "lira_record_tpr_at_1pct_fpr",
    "lira_record_auc",
    "canary_tpr_at_1pct_fpr",
    "canary_audited_epsilon",
    "gradient_canary_audited_epsilon",
    "replies_gaussian_epsilon",  # the gradient canaries on the sites' replies, final round: Gaussian pair at 95%
    "replies_gaussian_estimate",
    "lira_patient_tpr_at_01pct_fpr",
    "lira_patient_auc",
    "lira_patient_replies_auc",
    "lira_patient_replies_tpr_at_1pct_fpr",
    "patient_tpr_at_01pct_fpr",  # the strongest attack on people (global model or replies), final round
    "largest_attack_bound",  # the largest lower bound on epsilon any attack or audit gives, final round
)
PATIENT_ATTACKS = ("idia", "idia-replies", "lira-patient", "lira-patient-replies")


def final_attacks(attack: pd.DataFrame) -> dict[str, float]:
    """The last round's IDIA rates (on the global model, and on the sites' replies: the server as the
    adversary) and each audit's certified epsilon (NaN when the run had none; runs from before the
    audits have IDIA rows only, without an ``attack`` column)."""
    if "attack" not in attack.columns:
        attack = attack.assign(attack="idia")
    last = attack[attack["round"] == attack["round"].max()].set_index("attack")

    def value(name: str, column: str) -> float:
        return float(last.loc[name, column]) if name in last.index and column in last.columns else math.nan

    return {
        "tpr": value("idia", "tpr"),
        "fpr": value("idia", "fpr"),
        "epsilon_lower_bound": value("idia", "epsilon_lower_bound"),
        "idia_auc": value("idia", "auc"),
        "replies_tpr": value("idia-replies", "tpr"),
        "replies_fpr": value("idia-replies", "fpr"),
        "idia_tpr_at_1pct_fpr": value("idia", "tpr_at_1pct_fpr"),
        "lira_patient_tpr_at_1pct_fpr": value("lira-patient", "tpr_at_1pct_fpr"),
        "lira_record_tpr_at_1pct_fpr": value("lira-record", "tpr_at_1pct_fpr"),
        "lira_record_auc": value("lira-record", "auc"),
        "canary_tpr_at_1pct_fpr": value("canary", "tpr_at_1pct_fpr"),
        "canary_audited_epsilon": value("canary", "audited_epsilon"),
        "gradient_canary_audited_epsilon": value("gradient-canary", "audited_epsilon"),
        "replies_gaussian_epsilon": value("gradient-canary-replies", "gaussian_epsilon_95"),
        "replies_gaussian_estimate": value("gradient-canary-replies", "gaussian_epsilon_estimate"),
        "lira_patient_tpr_at_01pct_fpr": value("lira-patient", "tpr_at_0.1pct_fpr"),
        "lira_patient_auc": value("lira-patient", "auc"),
        "lira_patient_replies_auc": value("lira-patient-replies", "auc"),
        "lira_patient_replies_tpr_at_1pct_fpr": value("lira-patient-replies", "tpr_at_1pct_fpr"),
        "patient_tpr_at_01pct_fpr": max(
            (v for v in (value(a, "tpr_at_0.1pct_fpr") for a in PATIENT_ATTACKS) if not math.isnan(v)),
            default=math.nan,
        ),
        "largest_attack_bound": largest_bound(last),
    }


def largest_bound(last: pd.DataFrame) -> float:
    """The largest lower bound on epsilon among one round's attacks: each attack's indicative bound
    (from its TPR and FPR at 95%, Bonferroni over the run's evaluations) and each audit's certified
    one (one-run, Gaussian pair). Held against the accountant's epsilon: at or below it, no attack
    contradicts the accountant (the evaluator warns in the run when one does)."""
    columns = [c for c in ("epsilon_lower_bound",) if c in last.columns]
    bounds = pd.concat([last[columns].max(axis=1, skipna=True), certified_bounds(last)], axis=1).max(axis=1)
    return float(bounds.max()) if bounds.notna().any() else math.nan


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k eps, k e^((k-1) eps) delta): what a record-level (eps, delta) guarantee says about a patient
    with k records (the generic group-privacy bound; delta above 1 means no guarantee at all)."""
    if not math.isfinite(epsilon):
        return math.inf, 1.0
    exponent = (k - 1) * epsilon
    return k * epsilon, (math.inf if exponent > 700 else k * math.exp(exponent) * delta)


def largest_patient(run: RunSpec) -> int:
    """Most training pairs of any one patient in the run's data (the group that record-level DP must cover)."""
    config = json.loads((run.folder / "config.json").read_text())
    frame = pd.read_csv(config["resolved-manifest"], dtype=str, keep_default_na=False)
    return int(frame[frame["split"] == "train"].groupby("patient_id").size().max())


def relation_of(setting: Setting, rounds: pd.DataFrame) -> str:
    """The neighbouring data sets of the run's epsilon, read from its own rounds.csv (its
    ``neighbours`` column; older runs: the relation the sites' accountant used)."""
    if not setting.private or setting.unit == "site":
        return setting.relation
    column = "neighbours" if "neighbours" in rounds.columns else "relation"
    used = "/".join(sorted(set(rounds.loc[rounds["status"] == "trained", column].astype(str))))
    return used + (" + zero-out" if setting.relation.endswith("zero-out") else "")


def run_row(run: RunSpec) -> dict:
    """The final round of one run."""
    attack = final_attacks(pd.read_csv(run.folder / "attack.csv"))
    utility = pd.read_csv(run.folder / "utility.csv").iloc[-1]
    rounds = pd.read_csv(run.folder / "rounds.csv")
    config = json.loads((run.folder / "config.json").read_text())
    site_level = run.folder / "site_level.json"
    distributed = run.folder / "distributed.json"
    adversaries = json.loads(distributed.read_text())["epsilon"] if distributed.is_file() else {}
    setting = SETTINGS[run.setting]
    local_eps = float(rounds.loc[rounds["round"] == rounds["round"].max(), "epsilon"].max())
    k = largest_patient(run) if setting.unit == "record" else 1
    group_eps, group_delta = group_privacy(local_eps, float(config["delta"]), k) if k > 1 else (math.nan, math.nan)
    return {
        "setting": run.name,
        "target_epsilon": run.epsilon if run.epsilon is not None else math.inf,
        "seed": run.seed,
        "unit": setting.unit,
        "relation": relation_of(setting, rounds),
        "epsilon_local": local_eps,
        "largest_patient_pairs": k if setting.unit == "record" else math.nan,
        "patient_epsilon_group": group_eps,
        "patient_delta_group": group_delta,
        "epsilon_site": (
            json.loads(site_level.read_text())["epsilon"]
            if site_level.is_file()
            else float(adversaries["server"])
            if adversaries and json.loads(distributed.read_text()).get("level") == "site"
            else math.nan
        ),
        # distributed DP: the epsilon each adversary faces (the server alone, with colluding sites, a site's own share)
        **{f"epsilon_{k.replace('-', '_')}": float(adversaries.get(k, math.nan)) for k in ADVERSARIES},
        "noise_multiplier": config["resolved-noise-multiplier"],
        "site_noise_multiplier": config.get("resolved-site-noise-multiplier", 0.0),
        "rounds": int(utility["round"]),
        "sites": int(rounds["site"].nunique()),
        **{m: float(utility[m]) if m in utility else attack[m] for m in METRICS},
    }


RUN_KEY = ["setting", "target_epsilon", "seed"]


def earlier_rows(paths: Sequence[str | Path], *, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of ``runs.csv`` files written elsewhere (``compare.earlier-runs``), checked to hold every
    column today's rows have (a file from an older version is refused, naming what it lacks)."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"compare.earlier-runs: {path} lacks column(s) {missing}; re-run those runs here")
        frames.append(frame[list(columns)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def collect(runs: Sequence[RunSpec], *, earlier: Sequence[str | Path] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run rows (with ``earlier``'s rows of runs not finished here), and per (setting, target
    epsilon) mean and spread over seeds."""
    rows = pd.DataFrame([run_row(r) for r in runs])
    if earlier:
        before = earlier_rows(earlier, columns=list(rows.columns))
        here = set(map(tuple, rows[RUN_KEY].astype(str).values))
        before = before[[tuple(k) not in here for k in before[RUN_KEY].astype(str).values]]
        before = before.drop_duplicates(subset=RUN_KEY, keep="last")
        rows = pd.concat([rows, before], ignore_index=True).sort_values(["seed"], kind="stable").reset_index(drop=True)
    keys = ["setting", "target_epsilon", "unit", "relation"]
    agg = (
        rows.groupby(keys, sort=False)
        .agg(
            seeds=("seed", "count"),
            epsilon_local=("epsilon_local", "mean"),
            epsilon_site=("epsilon_site", "mean"),
            **{f"epsilon_{k}": (f"epsilon_{k}", "mean") for k in ("server", "colluding", "own_share")},
            patient_epsilon_group=("patient_epsilon_group", "max"),
            patient_delta_group=("patient_delta_group", "max"),
            noise_multiplier=("noise_multiplier", "mean"),
            site_noise_multiplier=("site_noise_multiplier", "mean"),
            sites=("sites", "first"),
            **{f"{m}_mean": (m, "mean") for m in METRICS},
            **{f"{m}_std": (m, "std") for m in METRICS},
        )
        .reset_index()
    )
    # client-level noise on the averaged update, in units of one site's clipped update (S)
    agg["site_noise_on_average"] = agg["site_noise_multiplier"] / agg["sites"]
    return rows, agg


def publication_text(cost: pd.DataFrame) -> str:
    lines = [
        "Publishing every run of this comparison costs the patients they share (identity level, composed over "
        "every run of one seed; PLD):",
        "",
    ]
    for r in cost.itertuples():
        lines.append(
            f"- seed {r.seed}: {_eps(r.epsilon_all_runs)} for all {r.runs} runs"
            + (
                f" ({r.runs_without_patient_bound} of them give a patient no bound: non-private, record-level "
                f"or site-level only); the identity-level runs alone compose to {_eps(r.epsilon_identity_runs)}"
                if r.runs_without_patient_bound
                else ""
            )
            + f", at delta {r.delta:g}."
        )
    return "\n".join(lines) + "\n"


def _delta(value: float) -> str:
    return "> 1 (void)" if value > 1 else f"{value:.1e}"


def _eps(value: float) -> str:
    return "-" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.2f}")


def _mean_spread(mean: float, std: float) -> str:
    """``mean ± std``; one seed has no spread, and printing ± 0.000 would claim one."""
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def _pair(r, *metrics: str) -> str:
    """Means over seeds, joined by " / " ("-" where a run had no such attack)."""
    return " / ".join("-" if math.isnan(getattr(r, f"{m}_mean")) else f"{getattr(r, f'{m}_mean'):.2f}" for m in metrics)


def plot_audited_vs_accounted(agg: pd.DataFrame, path: Path) -> Path:
    """``audit_vs_epsilon.png``: each setting's certified bounds against the accountant's epsilon
    (identity level, the largest site's) over the epsilon grid; above the diagonal is a contradiction."""
    fig, ax = plt.subplots(figsize=(6, 5))
    finite = agg[agg["epsilon_local"].apply(math.isfinite)]
    for metric, marker in (
        ("canary_audited_epsilon", "o"),
        ("gradient_canary_audited_epsilon", "^"),
        ("replies_gaussian_epsilon", "s"),
    ):
        for setting, g in finite.groupby("setting", sort=False):
            if g[f"{metric}_mean"].notna().any():
                ax.errorbar(
                    g["epsilon_local"],
                    g[f"{metric}_mean"],
                    yerr=g[f"{metric}_std"].fillna(0),
                    marker=marker,
                    capsize=3,
                    label=f"{setting}: {metric.replace('_audited_epsilon', '').replace('_epsilon', '').replace('_', ' ')}",
                )
    top = max([1.0, *finite["epsilon_local"].tolist()])
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="audited = accounted")
    ax.set(
        xlabel="accountant's epsilon (largest site, final round)",
        ylabel="audited epsilon (one-run, certified)",
        title="What the audits certify against what the accountant promises",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(agg: pd.DataFrame) -> str:
    head = (
        "| setting | target epsilon | unit and neighbouring data sets (what epsilon is about) | epsilon (local) | "
        "epsilon (site) | epsilon per adversary: server / server + colluders / a site's own share | "
        "per patient, record rows (group privacy, largest patient) | "
        "noise multiplier: local / site (site noise on the average, x S) | "
        "zero-shot acc | IDIA TPR | IDIA FPR | IDIA indicative eps bound | IDIA on the sites' replies: TPR / FPR | "
        "TPR at 1% FPR: IDIA / LiRA patient / LiRA record / canary | LiRA record AUC | "
        "audited eps: canary / gradient canary (certified) | "
        "gradient canaries on the replies, Gaussian pair: certified (95%, final round) / estimate | "
        "LiRA patient: AUC global / replies, TPR at 1% FPR on the replies | "
        "people: strongest attack's TPR at 0.1% FPR | largest lower bound on epsilon any attack gives | seeds |"
    )
    lines = [head, "|" + "---|" * 21]
    for r in agg.itertuples():
        pm = lambda m: _mean_spread(getattr(r, m + "_mean"), getattr(r, m + "_std"))  # noqa: E731
        site_noise = (
            f"{r.site_noise_multiplier:.2f} ({r.site_noise_on_average:.2f})" if r.site_noise_multiplier else "-"
        )
        local_noise = f"{r.noise_multiplier:.2f}" if r.noise_multiplier else "-"
        group = (
            "-"
            if math.isnan(r.patient_epsilon_group)
            else f"eps {_eps(r.patient_epsilon_group)}, delta {_delta(r.patient_delta_group)}"
        )
        lines.append(
            f"| {r.setting} | {_eps(r.target_epsilon)} | {r.unit}: {r.relation} | {_eps(r.epsilon_local)} | "
            f"{_eps(r.epsilon_site)} | {_adversaries(r)} | {group} | {local_noise} / {site_noise} | {pm('zero_shot_accuracy')} | {pm('tpr')} | {pm('fpr')} | "
            f"{pm('epsilon_lower_bound')} | {_pair(r, 'replies_tpr', 'replies_fpr')} | "
            f"{_pair(r, 'idia_tpr_at_1pct_fpr', 'lira_patient_tpr_at_1pct_fpr', 'lira_record_tpr_at_1pct_fpr', 'canary_tpr_at_1pct_fpr')} | "
            f"{_pair(r, 'lira_record_auc')} | "
            f"{_pair(r, 'canary_audited_epsilon', 'gradient_canary_audited_epsilon')} | "
            f"{_pair(r, 'replies_gaussian_epsilon', 'replies_gaussian_estimate')} | "
            f"{_pair(r, 'lira_patient_auc', 'lira_patient_replies_auc', 'lira_patient_replies_tpr_at_1pct_fpr')} | "
            f"{_pair(r, 'patient_tpr_at_01pct_fpr')} | {_pair(r, 'largest_attack_bound')} | {r.seeds} |"
        )
    return "\n".join(lines) + "\n"


def _adversaries(r) -> str:
    """distributed DP's three epsilons (server, with colluders, own share); "-" for every other setting."""
    values = [getattr(r, f"epsilon_{k}", math.nan) for k in ("server", "colluding", "own_share")]
    if math.isnan(values[0]):
        return "-"
    return " / ".join(_eps(v) for v in values)


def plot_against_epsilon(agg: pd.DataFrame, panels: dict[str, str], ylabel: str, path: Path) -> Path:
    """One panel per metric (``panels``: metric -> panel title), each with a line per private setting
    over the epsilon grid and the non-private settings as horizontal lines; a metric no run measured
    (e.g. the replies' attack switched off) gets no panel."""
    measured = {m: t for m, t in panels.items() if agg[f"{m}_mean"].notna().any()} or dict(list(panels.items())[:1])
    fig, axes = plt.subplots(1, len(measured), figsize=(7 * len(measured), 4.5), squeeze=False)
    for ax, (metric, title) in zip(axes[0], measured.items()):
        _epsilon_panel(ax, agg, metric)
        ax.set(ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _epsilon_panel(ax, agg: pd.DataFrame, metric: str) -> None:
    private = agg[agg["target_epsilon"].apply(math.isfinite)]
    for name, g in private.groupby("setting", sort=False):
        g = g.sort_values("target_epsilon")
        ax.errorbar(
            g["target_epsilon"],
            g[f"{metric}_mean"],
            yerr=g[f"{metric}_std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{name} ({g['unit'].iloc[0]})",
        )
    baselines = agg[~agg["target_epsilon"].apply(math.isfinite)].groupby("setting", sort=False)
    for k, (name, g) in enumerate(baselines):  # one line style per baseline, so two never look alike
        ax.axhline(
            g[f"{metric}_mean"].iloc[0],
            linestyle=("--", ":", "-.")[k % 3],
            color="grey" if "pooled" in name else "black",
            label=f"{name} (no DP)",
        )
    ax.set_xscale("log")
    ticks = sorted(set(private["target_epsilon"]))
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set(xlabel="target epsilon (per the setting's unit; log scale)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="best")


def publication_cost(runs: Sequence[RunSpec]) -> pd.DataFrame:
    """What publishing every run of one seed costs the patients they share (identity level).

    Runs of one seed train on the same patients: a patient of hospital h is in the pooled site of
    pooled runs and in site h of federated runs, so their spending is every identity-level event of
    those sites, composed. Record-level events do not bound a patient (see group privacy) and
    non-private or site-level-only runs give no patient-level bound: with any of them the cost is
    infinite, and the table says so beside the cost of the identity-level runs alone."""
    out = []
    for seed in sorted({r.seed for r in runs}):
        mine = [r for r in runs if r.seed == seed]
        delta = float(json.loads((mine[0].folder / "config.json").read_text())["delta"])
        per_site: dict[str, list] = {}
        pooled: list = []
        unbounded = []
        for run in mine:
            if SETTINGS[run.setting].unit != "identity" and "identity" not in SETTINGS[run.setting].unit:
                unbounded.append(run.label)
                continue
            store = LedgerStore(run.folder / "state" / "ledger.sqlite", delta=delta, create=False)
            for site in store.sites():
                (pooled if site == POOLED_SITE else per_site.setdefault(site, [])).extend(store.events(site))
            store.close()
        sites = per_site or {POOLED_SITE: []}
        identity_only = max(PrivacyLedger(delta=delta, events=tuple(pooled + ev)).epsilon() for ev in sites.values())
        out.append(
            {
                "seed": seed,
                "runs": len(mine),
                "delta": delta,
                "epsilon_identity_runs": identity_only,
                "epsilon_all_runs": math.inf if unbounded else identity_only,
                "runs_without_patient_bound": len(unbounded),
            }
        )
    return pd.DataFrame(out)


def write_outputs(
    out_dir: str | Path, runs: Sequence[RunSpec], *, earlier: Sequence[str | Path] = ()
) -> dict[str, Path]:
    out = Path(out_dir)
    rows, agg = collect(runs, earlier=earlier)
    paths = {
        "runs": out / "runs.csv",
        "table": out / "table.csv",
        "markdown": out / "table.md",
        "publication": out / "publication_cost.csv",
    }
    rows.to_csv(paths["runs"], index=False)
    agg.to_csv(paths["table"], index=False)
    cost = publication_cost(runs)
    cost.to_csv(paths["publication"], index=False)
    imported = len(rows) - len(runs)
    note = (
        f"\n{imported} of the {len(rows)} runs are rows of `earlier-runs` ({', '.join(map(str, earlier))}), run "
        "elsewhere; the publication cost above covers the runs finished here only.\n"
        if imported
        else ""
    )
    paths["markdown"].write_text(markdown_table(agg) + "\n" + publication_text(cost) + note)
    paths["utility_plot"] = plot_against_epsilon(
        agg, {"zero_shot_accuracy": "Utility"}, "zero-shot accuracy (held-out)", out / "utility_vs_epsilon.png"
    )
    paths["attack_plot"] = plot_against_epsilon(
        agg,
        {
            "tpr": "IDIA on the global model (anyone given the model)",
            "replies_tpr": "IDIA on each site's reply (the server's view)",
        },
        "IDIA TPR (final round)",
        out / "tpr_vs_epsilon.png",
    )
    paths["audit_plot"] = plot_audited_vs_accounted(agg, out / "audit_vs_epsilon.png")
    return paths
