"""``summary.md``: what was run, what the accountant promises, what the attacker extracted."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedclip.attacks.metrics import certified_bounds

UNIT_TEXT = {
    "identity": "one patient (all of their image-report pairs)",
    "record": "one image-report pair; a patient with k pairs is protected only through group privacy (about k times epsilon)",
}
MECHANISM_TEXT = {
    "distributed": "distributed DP over secure aggregation: each round is one DP-SGD step over every site's data; "
    "each unit's gradient is clipped to C, each site's clipped sum is rounded onto an integer grid (unbiased, the "
    "rounding's sqrt(d) counted in the sensitivity) and gets a share of Skellam noise, and Flower's SecAgg+ sums "
    "the shares modulo 2^bits, so the server sees the sum only; adding or removing a unit adds or removes one "
    "clipped term, present with probability q; accounted in Renyi DP (the Skellam bound of Agarwal, Kairouz and Liu "
    "2021, Poisson subsampling bounded in both directions)",
    "microbatch-1": "one unit per micro-batch: adding or removing a unit adds or removes one clipped term, present with "
    "probability q (sensitivity C), accounted with Opacus' add-or-remove accountant",
    "microbatch": "per-micro-batch clipping: one unit changes one fixed hashed micro-batch, a replace-one change of one "
    "clipped term (sensitivity C), accounted with a replace-one PLD",
    "unit": "per-unit clipping of each unit's own contrastive loss against public negatives: adding or removing a unit "
    "adds or removes one clipped term (sensitivity C), accounted with Opacus' add-or-remove accountant",
    "paper": "paper mode: one clipped batch, a unit moves it by up to 2C (sensitivity 2C), accounted with Opacus' "
    "add-or-remove accountant",
    "cadp": "CADP: each training image encoded by an INN fitted to the public population, its latent clipped on its "
    "own to radius s (replace-one sensitivity 2s), Gaussian noise added, decoded without a label; the images "
    "of a unit composed in a replace-one PLD",
    "maskdp": "MaskDP: each training image's masked region clipped on its own to radius s (replace-one sensitivity "
    "2s within the mask) and noised; the images of a unit composed in a replace-one PLD",
    "mask-replace": "mask-replace: each training image's masked region replaced by a public stand-in's pixels "
    "(anonymization, no epsilon)",
}
INPUT_TEXT = (
    "Each site privatized its own training images once, before its first round, with OS randomness ({mechanism}). "
    "Epsilon is an upper bound under a *local, replace-one* relation: any patient's training images replaced by any "
    "other images of the same number (at most {k} per unit), at delta = {delta:g}; training on the privatized images "
    "is post-processing and adds nothing. **Not covered**: the reports paired with the images (names included), the "
    "number of images, {mask}and that a patient is in the data at all: this epsilon is not about membership, which "
    "the attacks below measure."
)


def mechanism_text(config: Mapping[str, Any]) -> str:
    mode = str(config["dp-mode"])
    if mode == "microbatch" and int(config.get("microbatch-size", 1)) == 1:
        mode = "microbatch-1"
    if mode in ("cadp", "maskdp", "mask-replace"):
        return MECHANISM_TEXT[mode]
    return MECHANISM_TEXT[mode] + (
        "; the noisy sum is divided by a public number (q x declared units), never by a count of the data"
        if mode != "paper"
        else ""
    )


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _released(config: Mapping[str, Any]) -> str:
    extra = []
    if config.get("release-loss-noise", 0) > 0:
        extra.append(
            f"the mean training loss (blocks clipped to [0, {config['release-loss-bound']}], noise multiplier "
            f"{config['release-loss-noise']}, charged in the ledger)"
        )
    if config.get("release-count-noise", 0) > 0:
        extra.append(f"the number of units (noise multiplier {config['release-count-noise']}, charged in the ledger)")
    if config.get("dp-mode") == "distributed" or (config.get("secure-agg") and config.get("client-dp-epsilon", 0) > 0):
        return (
            "Released by each site every round: its masked vector, uniform to the server alone (its clipped sum, or its "
            "clipped update, on the grid plus its noise share, which only the secure sum unmasks), and in clear its "
            "privacy events and the units it declares (public); which sites answered each SecAgg+ stage is visible to "
            "the server."
        )
    text = (
        "Released by each site every round: its trainable parameters (the accounted mechanism), its privacy "
        "events, and a public weight it declares before training (1.0 in a simulation)"
    )
    return (
        text
        + (", and " + "; ".join(extra) if extra else "; no count, loss or other value computed from its data")
        + "."
    )


ATTACK_HEADER = (
    "| round | attack | TPR | FPR | AUC | TPR at 1% FPR | indicative epsilon lower bound | "
    "audited epsilon (one-run, certified) | Gaussian-pair audit (white-box, certified under its model) | "
    "max site epsilon (accountant) |",
    "|---|---|---|---|---|---|---|---|---|---|",
)
AUDIT_COLUMNS = (
    "auc",
    "tpr_at_1pct_fpr",
    "audited_epsilon",
    "audit_guesses",
    "audit_correct",
    "gaussian_epsilon",
    "gaussian_epsilon_95",
    "gaussian_epsilon_estimate",
    "gaussian_mu",
)


def attack_rows(attack: pd.DataFrame) -> list[str]:
    """The attack table's rows, one per round and attack: in the run's summary and in the auditor's.
    Randomised audits (canaries) show the certified bound; the others the indicative one."""
    attack = attack.assign(**{c: float("nan") for c in AUDIT_COLUMNS if c not in attack.columns})  # older runs
    attack = attack.assign(attack=attack["attack"] if "attack" in attack.columns else "idia")
    rows = []
    for row in attack.itertuples():
        audited = float(row.audited_epsilon) == float(row.audited_epsilon)
        one_run = (
            f"**{row.audited_epsilon:.3f}** ({int(row.audit_correct)}/{int(row.audit_guesses)} guesses right)"
            if audited
            else ""
        )
        gaussian = (
            f"**{row.gaussian_epsilon:.3f}** (mu >= {row.gaussian_mu:.3f}; this row alone at 95%: "
            f"{row.gaussian_epsilon_95:.3f}; estimate {row.gaussian_epsilon_estimate:.3f})"
            if float(row.gaussian_epsilon) == float(row.gaussian_epsilon)
            else ""
        )
        indicative = "" if audited else f"{row.epsilon_lower_bound:.3f}"
        apart = "" if _comparable(row) else " (about images: not comparable)"
        rows.append(
            f"| {row.round} | {row.attack} | {row.tpr:.3f} | {row.fpr:.3f} | {_fmt(float(row.auc))} | "
            f"{_fmt(float(row.tpr_at_1pct_fpr))} | {indicative} | {one_run} | {gaussian} | "
            f"{_fmt(float(row.max_site_epsilon))}{apart} |"
        )
    return rows


def _comparable(row) -> bool:
    """An attack's bound is held against the epsilon unless the run said its epsilon is not about
    membership (input-level privatization; older runs have no column and are comparable)."""
    value = getattr(row, "comparable_to_epsilon", True)
    return value is True or str(value).lower() == "true" or value != value


def contradictions(attack: pd.DataFrame) -> list[str]:
    """A loud line for every round where a certified bound exceeds the accountant's epsilon (when
    that epsilon is about membership at all)."""
    if "audited_epsilon" not in attack.columns:
        return []
    comparable = [_comparable(r) for r in attack.itertuples()]
    attack = attack.assign(certified=certified_bounds(attack))
    bad = attack[(attack["certified"] > attack["max_site_epsilon"]) & pd.Series(comparable, index=attack.index)]
    return (
        [
            "",
            *(
                f"**WARNING: round {r.round}: the {r.attack} audit certifies epsilon >= {r.certified:.3f}, above "
                f"the accountant's {r.max_site_epsilon:.3f}: the mechanism is less private than the ledger says "
                "(or, with 5% probability over the whole run, the audit is wrong"
                + (
                    ", or the canaries' scores are far from the Gaussian pair the bound assumes: see normality_p"
                    if r.certified > r.audited_epsilon
                    else ""
                )
                + ").**"
                for r in bad.itertuples()
            ),
        ]
        if len(bad)
        else []
    )


AUDIT_TEXT = (
    "Attacks: **idia** (names and other photos of each person, Hintersdorf et al.); **idia-replies** and "
    "**lira-patient-replies** (the same attacks on each site's reply before averaging, the server's view: a person "
    "is a member if any site's reply names them, scored by the highest); **lira-patient** and "
    "**lira-record** (likelihood-ratio attacks against models that never saw a target: the base model, or with "
    "`lira-references` the attacker's reference models trained the run's way on the public population (offline "
    "LiRA); on a person's name given other photos, and on an exact training pair against held-out pairs; read "
    "their AUC and TPR at 1% and 0.1% FPR); **canary** (canary patients, each "
    "trained with probability 1/2 by the auditor's secret, scored by their own reports' likelihood against the base "
    "model); **gradient-canary** (Dirac gradient canaries inserted as units at the sites, scored by how far the "
    "global model moved down their coordinate: a white-box audit of the mechanism). The *audited epsilon* of a "
    "randomised audit is a statistically valid lower bound on the epsilon of one unit at its site (Steinke, Nasr and "
    "Jagielski 2023, one-run auditing), Bonferroni-corrected over the rounds, the guess counts and the run's randomised "
    "audits (all of them jointly 95%): above the "
    "accountant's epsilon, it would mean the mechanism is less private than the ledger says. It is usually far "
    "below (audits of one run are loose), so it shows what this attack certifies, not what the model protects. The "
    "bound of a non-randomised attack is *indicative, not a certificate*: it uses one-sided Clopper-Pearson "
    "intervals on TPR and FPR (Bonferroni over rounds) and assumes away that membership is fixed by design and that one model's decisions "
    "about different people are dependent. All bounds are about one unit (a person for IDIA and canaries): compare "
    "them with identity-level epsilon. An input-level epsilon (CADP, MaskDP) is about a unit's images, not its "
    "membership: the attacks measure what remains, and their bounds are not held against it (marked "
    "'not comparable')."
)


def write_summary(
    path: str | Path,
    *,
    config: Mapping[str, Any],
    rounds: pd.DataFrame,
    attack: pd.DataFrame,
    utility: pd.DataFrame,
    noise_multiplier: float,
    site_level: Mapping[str, Any] | None = None,
    distributed: Mapping[str, Any] | None = None,
    failure: str | None = None,
    site_ledgers: Mapping[str, float] | None = None,
) -> Path:
    """``summary.md``: what ran, what the accountant promises, what the attacker extracted, utility.

    ``site_ledgers``: each site's epsilon by its own ledger, where the server can read it (a
    simulation); a deployed site's stays at the site (its ``spending.md``)."""
    lines = ["# fedclip run summary", ""]
    lines += _what_ran(config, noise_multiplier=noise_multiplier, failure=failure)
    lines += _what_the_accountant_promises(config, rounds=rounds, site_level=site_level, site_ledgers=site_ledgers)
    lines += _per_adversary(config, distributed)
    lines += _what_the_attacker_extracted(config, attack)
    lines += _utility(utility)
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _what_ran(config: Mapping[str, Any], *, noise_multiplier: float, failure: str | None) -> list[str]:
    lines = [f"**The run stopped: {failure}**", ""] if failure else []
    overrides = [k for k in ("allow-large-delta", "allow-outside-paths") if config.get(k)]
    if overrides:
        lines += [
            "**Overrides in force: "
            + ", ".join(f"{k} = true" for k in overrides)
            + (
                " (delta is above 1/(units at the smallest site): the epsilons below are not meaningful)"
                if "allow-large-delta" in overrides
                else ""
            )
            + ".**",
            "",
        ]
    if config.get("reproducible-noise"):
        lines += [
            "**WARNING: reproducible-noise was on. Noise and sampling were seeded from the run config, so "
            "this run is NOT PRIVATE AGAINST THE SERVER: every epsilon below holds only against parties who do "
            "not know the config.**",
            "",
        ]
    return lines + [
        f"- dp mode: **{config['dp-mode']}**, privacy unit: **{config['privacy-unit']}**, "
        + (
            f"input-level: noise multiplier {float(config['input-noise-multiplier']):.4g} over radius "
            f"{float(config['input-radius-resolved']):.4g}, {config['input-images-per-unit']} images per unit, released "
            "once per site; training adds no noise, "
            if "input-noise-multiplier" in config
            else f"noise multiplier {noise_multiplier:.4g}, clipping norm C = {config['max-grad-norm']}, "
            f"sample rate {config['sample-rate']}, "
        )
        + f"{config['local-steps']} local steps per round, "
        f"{config['num-rounds']} rounds, delta = {config['delta']:g}",
        f"- strategy: {config['strategy']} wrapped by PrivacyBudgetStrategy (budget {config['budget']}"
        + (f", per site: {config['site-budgets']}" if config["site-budgets"] else "")
        + ")",
        (
            "- a round stops the run if any selected site fails, refuses or does not reply (failure-quorum 1)"
            if config.get("failure-quorum", 1.0) >= 1
            else f"- failure-quorum {config['failure-quorum']:g}: a round counts if at least that share of its selected sites "
            "trained; failed sites were tolerated"
        ),
        "",
    ]


def _promise(config: Mapping[str, Any]) -> list[str]:
    """What each site's epsilon means, by mode."""
    if config["dp-mode"] == "nonprivate":
        return ["Locally nothing: sites add no noise, so the per-site epsilon below is infinite."]
    if config["dp-mode"] == "mask-replace":
        return [
            f"No epsilon: {mechanism_text(config)}; what lies outside each mask is trained on as it is, so "
            "the per-site epsilon below is infinite."
        ]
    if config["dp-mode"] in ("cadp", "maskdp"):
        return [
            INPUT_TEXT.format(
                mechanism=mechanism_text(config),
                delta=float(config["delta"]),
                k=config["input-images-per-unit"],
                mask="pixels outside each mask and the mask itself, " if config["dp-mode"] == "maskdp" else "",
            )
        ]
    return [
        f"Each epsilon is an upper bound for data sets that differ by adding or removing {UNIT_TEXT[config['privacy-unit']]}, "
        f"at delta = {config['delta']:g}, composed over every round the site trained. Mechanism: "
        f"{mechanism_text(config)}.",
        "",
        (
            "Threat model: distributed DP; the server is the adversary, and it sees only the secure sum. The sum "
            "carries the noise of every share in it, so its protection rests on secure aggregation (fewer than the "
            "reconstruction threshold of sites colluding with the server) and on every site adding its share: the "
            "table below states the epsilon against each adversary. Each site draws its noise, rounding and sampling "
            "from OS entropy"
            if config["dp-mode"] == "distributed"
            else "Threat model: local DP; the server is the adversary. Each site draws its noise and sampling from "
            "OS entropy"
        )
        + (" (here: NOT, reproducible-noise was on)" if config.get("reproducible-noise") else "")
        + ", enforces its own policy and keeps its own ledger; the server's ledger is write-ahead (a round is "
        "charged before it is sent; failed, refused or lost replies keep their charge).",
    ]


ADVERSARY_TEXT = {
    "server": ("the server alone", "SecAgg+: fewer than {threshold} sites collude with it"),
    "colluding": (
        "the server and {colluders} colluding site(s)",
        "the other sites' shares; fewer than {threshold} collude",
    ),
    "own-share": ("anyone, the other sites included", "nobody: a site's own share only"),
}


LEVEL_TEXT = {
    "patient": "distributed DP, about one unit as above",
    "site": "client-level DP summed by secure aggregation, about one whole site's update: zero-out",
}


def _per_adversary(config: Mapping[str, Any], distributed: Mapping[str, Any] | None) -> list[str]:
    """dp-mode distributed: one epsilon per adversary, each over the shares really in every decoded sum."""
    if not distributed:
        return []
    fill = {"threshold": distributed["threshold"], "colluders": distributed["colluders"]}
    lines = [
        "",
        f"### Epsilon per adversary ({LEVEL_TEXT[distributed.get('level', 'patient')]}, {distributed['sums']} decoded "
        f"sums, delta {float(distributed['delta']):g})",
        "",
        "Each figure composes, over every secure sum the server decoded, the Skellam noise that adversary cannot "
        "subtract (the shares really in the sum: a site lost before sending its masked vector adds none). The site "
        "epsilons above are the server-alone figure planned for the fewest survivors a decodable sum has (charged "
        "write-ahead): never below the first row.",
        "",
        "| adversary | trusts | epsilon |",
        "|---|---|---|",
    ]
    for key, (who, trusts) in ADVERSARY_TEXT.items():
        eps = distributed["epsilon"][key]
        lines.append(f"| {who.format(**fill)} | {trusts.format(**fill)} | {_fmt(float(eps))} |")
    return lines + [""]


def _what_the_accountant_promises(
    config: Mapping[str, Any],
    *,
    rounds: pd.DataFrame,
    site_level: Mapping[str, Any] | None,
    site_ledgers: Mapping[str, float] | None = None,
) -> list[str]:
    lines = ["## What the accountant promises", "", *_promise(config)]
    if "neighbours" in rounds.columns and len(rounds):
        first = rounds.iloc[0]
        lines += [
            "",
            f"Every site epsilon in this summary and in `rounds.csv`: **neighbouring data sets: "
            f"{first['neighbours']}**; covered: {first['covers']}.",
        ]
    if site_level:
        lines += [
            "",
            f"Client-level DP at the server: each site's update clipped to {site_level['clip_norm']}, "
            f"noise multiplier {site_level['noise_multiplier']:.4g} on the average, over {site_level['rounds']} rounds: "
            f"**epsilon {site_level['epsilon']:.3f}** at delta {site_level['delta']:g} under the *zero-out* relation "
            "(one site's clipped update replaced by zero, the number of sites fixed); under replace-one (a site's "
            f"data replaced by anything, sensitivity 2S) epsilon {site_level['epsilon_replace_one']:.3f}. PLD "
            f"accountant, no sampling amplification (Flower's RDP figure: {site_level['epsilon_flower_rdp']:.3f}).",
        ]
    last = int(rounds["round"].max()) if len(rounds) else 0
    final_sites = rounds[rounds["round"] == last][["site", "epsilon", "budget"]] if len(rounds) else rounds
    # rounds a site trained, and rounds the server charged it for (every round it was selected in:
    # a site that failed, refused or was lost trained nothing, and its charge stays in the server's ledger)
    status = rounds["status"] if "status" in rounds else pd.Series("trained", index=rounds.index)
    trained = rounds[status == "trained"].groupby("site").size() if len(rounds) else pd.Series(dtype=int)
    charged = rounds[status != "not-selected"].groupby("site").size() if len(rounds) else pd.Series(dtype=int)
    lines += [
        "",
        "| site | rounds trained | rounds charged by the server | epsilon (the server's ledger) "
        "| epsilon (the site's own ledger) | budget |",
        "|---|---|---|---|---|---|",
    ]
    for row in final_sites.itertuples():
        own = (site_ledgers or {}).get(row.site)
        lines.append(
            f"| {row.site} | {int(trained.get(row.site, 0))} | {int(charged.get(row.site, 0))} "
            f"| {_fmt(float(row.epsilon))} | {_fmt(float(own)) if own is not None else 'at the site (spending.md)'} "
            f"| {row.budget} |"
        )
    failed = rounds[status.isin(["failed", "refused", "lost"])]
    if len(failed):
        lines += [
            "",
            "Sites that did not train when selected. The server's ledger keeps every such round's planned "
            "charge: it cannot verify what a site did. The site's own ledger says what the site did: "
            + "; ".join(WHY_CHARGED[s] for s in sorted(set(failed["status"])))
            + " (a site's own ledger may also hold other runs, or, in dp-mode distributed, the figure its policy's "
            "adversary faces).",
            "",
            "| round | site | status | reason |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r.round} | {r.site} | {r.status} | {str(r.reason)[:200]} |" for r in failed.itertuples()]
    return lines + ["", _released(config), ""]


WHY_CHARGED = {
    "refused": "a site refuses before it charges, so its own ledger has nothing for a refused round",
    "failed": "a site charges before it reads any data, so a round that failed there is charged in both ledgers "
    "(conservative: the data may have been read)",
    "lost": "a lost site (no reply) is charged in its own ledger if it received the round before it was lost",
}


def _what_the_attacker_extracted(config: Mapping[str, Any], attack: pd.DataFrame) -> list[str]:
    lines = ["## What the attacker extracted, and what the audit certifies", "", *ATTACK_HEADER]
    lines += attack_rows(attack)
    lines += contradictions(attack)
    if config.get("dp-mode") == "distributed" or (config.get("secure-agg") and config.get("client-dp-epsilon", 0) > 0):
        lines += [
            "",
            "**idia-replies: not run.** Over secure aggregation the server never holds a site's reply: each masked "
            "vector is uniform to it and only the sum is decoded, so the model the sum produces (the rows above) is "
            "all an attack on the replies has to work on.",
        ]
    if not len(attack):
        lines += [
            "",
            "No attack ran during this run: in a deployment the server holds no targets. The auditor, who "
            "does, attacks every round's saved model (`models/`) with `fedclip audit RUN_DIR --targets FILE`.",
        ]
    return lines + ["", AUDIT_TEXT, ""]


def _utility(utility: pd.DataFrame) -> list[str]:
    lines = [
        "## Utility on held-out patients",
        "",
        "| round | zero-shot accuracy | recall@1 | recall@5 |",
        "|---|---|---|---|",
    ]
    for row in utility.itertuples():
        lines.append(f"| {row.round} | {row.zero_shot_accuracy:.3f} | {row.recall_at_1:.3f} | {row.recall_at_5:.3f} |")
    return lines + [
        "",
        "Plots: `epsilon.png`, `attack.png`, `utility.png`. Tables: `rounds.csv`, `attack.csv`, "
        "`attack_sites.csv`, `utility.csv`.",
        "",
    ]
