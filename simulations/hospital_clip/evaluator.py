"""The per-round hook: utility and IDIA against the global model, beside each site's epsilon.

With reply observers (``fedclip.attacks.replies``) it also writes the attacks on the round's site
replies (the server as the adversary), which the strategy ran as the replies arrived, beside the
attacks on the average.

Passed to ``Strategy.start(..., evaluate_fn=...)``; called before the first round and after
each. It also checkpoints the global model, so a resumed run continues from the last round, and
keeps every round's global model under ``models/`` for an auditor who attacks them later
(``fedclip audit``): the server publishes these models anyway, so keeping them costs no privacy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedclip.attacks.base import Attack, AttackDecisions
from fedclip.attacks.metrics import attack_tables, certified_bounds, score_rows
from fedclip.attacks.one_run import run_confidences
from fedclip.attacks.replies import ReplyObserver
from fedclip.data.tensors import PairData
from fedclip.evaluation.retrieval import retrieval_recall
from fedclip.evaluation.zero_shot import zero_shot_accuracy
from fedclip.models.arrays import load_arrays
from fedclip.progress import progress_bar, say
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.tracking import Tracker
from strategies.faults import crash_point

# each attack's figures logged to the tracker (the CSV has every column)
TRACKED_ATTACK_METRICS = (
    "tpr",
    "fpr",
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "epsilon_lower_bound",
    "audited_epsilon",
    "gaussian_epsilon",
)


class RoundEvaluator:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        tokenizer: Callable,
        test: PairData,
        validation: PairData | None = None,
        attacks: list[Attack],
        files: RunFiles,
        epsilons: Callable[[], dict[str, float]],
        delta: float,
        state_dir: Path,
        round_offset: int,
        total_rounds: int,
        trained_this_round: Callable[[], bool],
        strategy_seconds: Callable[[], float] = lambda: 0.0,
        reply_attacks: Sequence[ReplyObserver] = (),
        comparable: bool = True,
        evaluate_every: int = 1,
        server_state: Callable[[], dict] = dict,
        tracker: Tracker | None = None,
    ) -> None:
        """``comparable``: the sites' epsilon bounds membership of a unit (False for input-level
        privatization, whose epsilon is about images): only then is an attack's bound held against it."""
        self.model, self.tokenizer, self.test, self.attacks = model, tokenizer, test, attacks
        self.validation = validation  # the server's validation patients (validation-patients), scored apart
        self.tracker = tracker  # TensorBoard / MLflow: a view of what the tables record
        self.files, self.epsilons, self.delta = files, epsilons, delta
        self.state_dir, self.round_offset, self.total_rounds = state_dir, round_offset, total_rounds
        self.evaluate_every = evaluate_every  # and after the last round
        self.server_state = server_state  # checkpointed beside the model (the server optimizer's moments)
        self.trained_this_round, self.strategy_seconds = trained_this_round, strategy_seconds
        self.reply_attacks, self.comparable = tuple(reply_attacks), comparable
        self.started = time.time()
        # the bound is printed after every round: a Bonferroni correction over all of them keeps the
        # printed bounds jointly valid at 95% (each round's at 1 - 0.05 / (rounds + 1)); the randomised
        # audits' certified bounds hold jointly over every audit too
        self.confidence, self.audit_confidence = run_confidences(
            rounds=total_rounds + 1, attacks=[*attacks, *self.reply_attacks]
        )
        self.last_end = time.time()  # end of the previous evaluation: the train phase runs between
        self.bar = progress_bar(total=total_rounds - round_offset, desc="rounds", unit="round", leave=True)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        called = time.time()
        round_ = self.round_offset + server_round
        if server_round == 0 and self.round_offset > 0:
            return None  # resumed: round `round_offset` was evaluated before the interruption
        if server_round > 0 and not self.trained_this_round():
            return None  # no site could train: the model did not change
        if server_round > 0 and round_ != self.total_rounds and round_ % self.evaluate_every:
            self._checkpoint(round_, arrays, keep=False)  # a round between evaluations: resumable all the same
            crash_point("saved", round_)
            self.bar.update(1)
            return None
        load_arrays(self.model, arrays)
        eps = self.epsilons()
        max_eps = max(eps.values()) if eps else 0.0
        recall = retrieval_recall(self.model, self.test)
        utility = {
            "round": round_,
            "zero_shot_accuracy": zero_shot_accuracy(self.model, self.tokenizer, self.test),
            "recall_at_1": recall["image_to_text_r1"],
            "recall_at_5": recall["image_to_text_r5"],
        }
        utility["validation_zero_shot_accuracy"] = (
            zero_shot_accuracy(self.model, self.tokenizer, self.validation) if self.validation is not None else ""
        )
        self.files.append("utility", [utility])
        if self.tracker is not None:
            self.tracker.log_metrics(
                round_,
                {
                    **{k: v for k, v in utility.items() if k != "round"},
                    **{f"epsilon/{site}": e for site, e in eps.items()},
                },
            )
        line = [
            f"round {round_}/{self.total_rounds}",
            f"zero-shot {utility['zero_shot_accuracy']:.3f}",
            f"max site epsilon {max_eps:.2f}",
        ]
        for attack in self.attacks:
            line.append(self._record(attack(self.model), round_=round_, max_eps=max_eps))
        for observer in self.reply_attacks:
            on_replies = observer.decisions(round_)
            if on_replies is not None:
                line.append(self._record(on_replies, round_=round_, max_eps=max_eps))
        self._checkpoint(round_, arrays)
        crash_point("saved", round_)
        say(" | ".join(line) + f" | {time.time() - self.started:.0f}s")
        timing = {
            "round": round_,
            "evaluate_seconds": time.time() - called,
            "train_phase_seconds": called - self.last_end if server_round > 0 else 0.0,
            "strategy_seconds": self.strategy_seconds() if server_round > 0 else 0.0,
        }
        self.files.append("timings", [timing])
        if self.tracker is not None:
            self.tracker.log_metrics(round_, {f"time/{k}": v for k, v in timing.items() if k != "round"})
        self.last_end = time.time()
        if server_round > 0:
            self.bar.update(1)
        return MetricRecord(
            {
                "zero-shot-accuracy": utility["zero_shot_accuracy"],
                "max-site-epsilon": max_eps if math.isfinite(max_eps) else -1.0,
            }
        )

    def _record(self, decisions: AttackDecisions, *, round_: int, max_eps: float) -> str:
        """Write one attack's round to the run's tables; return its part of the console line."""
        m, sites = attack_tables(
            decisions,
            round_=round_,
            max_site_epsilon=max_eps,
            delta=self.delta,
            confidence=self.audit_confidence if decisions.randomised else self.confidence,
        )
        m["comparable_to_epsilon"] = self.comparable
        self.files.append("attack", [m])
        if self.tracker is not None:
            self.tracker.log_metrics(round_, {f"attack/{decisions.attack}/{k}": m[k] for k in TRACKED_ATTACK_METRICS})
        self.files.append("attack_sites", sites)
        self.files.append("attack_scores", score_rows(decisions, round_=round_))
        if m["audited_epsilon"] == m["audited_epsilon"]:  # a one-run audit (canaries): its bound is the valid one
            certified = float(certified_bounds(pd.DataFrame([m])).iloc[0])
            gaussian = (
                f", Gaussian pair >= {m['gaussian_epsilon']:.2f}"
                if m["gaussian_epsilon"] == m["gaussian_epsilon"]
                else ""
            )
            return (
                f"{decisions.attack} AUC {m['auc']:.2f} audited eps >= {m['audited_epsilon']:.2f} "
                f"({m['audit_correct']}/{m['audit_guesses']} guesses right{gaussian})"
                + (
                    (" ABOVE THE ACCOUNTANT'S" if certified > max_eps else "")
                    if self.comparable
                    else " (not comparable: the sites' epsilon is about images, not membership)"
                )
            )
        return f"{decisions.attack} TPR {m['tpr']:.2f} FPR {m['fpr']:.2f} eps_lb {m['epsilon_lower_bound']:.2f}"

    def close(self) -> None:
        self.bar.close()

    def _checkpoint(self, round_: int, arrays: ArrayRecord, *, keep: bool = True) -> None:
        """``keep``: also under ``models/`` for the auditor (evaluated rounds)."""
        saved = {"round": round_, "state_dict": arrays.to_torch_state_dict()}
        if keep:
            _save_atomic(saved, self.files.dir / "models" / f"round_{round_:03d}.pt")
        # last: the point a resumed run continues from, with what the server's own optimizer carries
        _save_atomic({**saved, "server_state": self.server_state()}, self.state_dir / "global.pt")


def _save_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
