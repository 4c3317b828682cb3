"""The server as the adversary: the attack on each site's reply, and the union over replies."""

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord

from fedclip.attacks.base import AttackDecisions
from fedclip.attacks.replies import ReplyAttack, observe_each, reply_rounds

TARGETS = pd.DataFrame(
    {"target": ["p0", "p1", "p2", "p3"], "site": ["s1", "s2", "", ""], "is_member": [True, True, False, False]}
)


class WeightReader:
    """Stand-in attack for this unit: calls target i a member when the model's weight i is > 0."""

    name = "idia"

    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        w = model.weight.detach().flatten()[:4].numpy()
        return AttackDecisions(attack=self.name, frame=TARGETS.assign(predicted_member=w > 0, score=w))


def _model() -> torch.nn.Module:
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    return model


def _reply(*values: float) -> ArrayRecord:
    return ArrayRecord({"weight": torch.tensor([list(values)], dtype=torch.float32)})


def test_a_person_is_a_member_if_any_sites_reply_names_them_and_the_global_model_is_untouched():
    model = _model()
    attack = ReplyAttack(WeightReader(), model=model, when=lambda r: True)
    attack.observe(3, "s1", _reply(1.0, -1.0, -1.0, -1.0))  # s1's model names p0
    attack.observe(3, "s2", _reply(-1.0, 2.0, 0.5, -1.0))  # s2's names p1, and p2 (a false positive)
    frame = attack.decisions(3).frame
    assert frame["predicted_member"].tolist() == [True, True, True, False]
    assert frame["named_by"].tolist() == ["s1", "s2", "s2", ""]
    assert frame["score"].tolist() == [1.0, 2.0, 0.5, -1.0]  # the highest over the replies
    assert (frame["replies"] == 2).all() and attack.decisions(3) is None, "a round's calls are read once"
    assert (model.weight == -1.0).all(), "the replies are loaded into the attack's own copy"
    assert AttackDecisions(attack=attack.name, frame=frame).attack == "idia-replies"


def test_only_the_chosen_rounds_are_attacked_and_a_round_never_evaluated_is_dropped():
    attack = ReplyAttack(WeightReader(), model=_model(), when=reply_rounds("final", total_rounds=4))
    attack.observe(3, "s1", _reply(1.0, 1.0, 1.0, 1.0))
    assert attack.decisions(3) is None
    every = ReplyAttack(WeightReader(), model=_model(), when=reply_rounds("every", total_rounds=4))
    every.observe(2, "s1", _reply(1.0, 1.0, 1.0, 1.0))  # round 2 failed its quorum: never evaluated
    every.observe(3, "s1", _reply(-1.0, 1.0, -1.0, -1.0))
    assert every.decisions(3).frame["predicted_member"].tolist() == [False, True, False, False]
    assert every.decisions(2) is None, "an older round's calls are dropped, not kept"
    off = reply_rounds("off", total_rounds=4)
    assert not any(off(r) for r in range(6))


def test_a_reply_the_model_cannot_hold_and_a_bad_setting_are_refused_by_name():
    attack = ReplyAttack(WeightReader(), model=_model(), when=lambda r: True)
    with pytest.raises(ValueError, match="shape"):
        attack.observe(1, "s1", ArrayRecord({"weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="attack-replies.*'final'"):
        reply_rounds("last", total_rounds=3)


def test_replies_attacked_with_other_targets_are_refused():
    class Shuffled(WeightReader):
        calls = 0

        def __call__(self, model):
            out = super().__call__(model)
            Shuffled.calls += 1
            return (
                out if Shuffled.calls == 1 else AttackDecisions(out.attack, out.frame.iloc[::-1].reset_index(drop=True))
            )

    attack = ReplyAttack(Shuffled(), model=_model(), when=lambda r: True)
    attack.observe(1, "s1", _reply(1.0, 1.0, 1.0, 1.0))
    attack.observe(1, "s2", _reply(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="other targets"):
        attack.decisions(1)


def test_an_observer_that_fails_does_not_keep_the_others_from_seeing_the_arrays(caplog):
    class Recorder:
        def __init__(self, name: str, *, fails: bool) -> None:
            self.name, self.fails, self.seen = name, fails, []

        def sent(self, round_, arrays):
            self._see(("sent", round_))

        def observe(self, round_, site, arrays):
            self._see(("reply", round_, site))

        def decisions(self, round_):
            return None

        def _see(self, what):
            if self.fails:
                raise RuntimeError("disk full")
            self.seen.append(what)

    broken, working = Recorder("broken-audit", fails=True), Recorder("working-audit", fails=False)
    on_reply, on_send = observe_each([broken, working])
    arrays = ArrayRecord({"w": torch.zeros(2)})
    with caplog.at_level("WARNING", logger="flwr"):
        on_send(3, arrays)
        on_reply(3, "hospital_a", arrays)
    assert working.seen == [("sent", 3), ("reply", 3, "hospital_a")]
    assert "broken-audit failed on round 3's reply from hospital_a: disk full" in caplog.text
