import pytest

from fedclip.privacy.events import DpEvent, PrivacyUnit, Relation


def test_event_round_trips_through_json_and_is_immutable():
    event = DpEvent(
        noise_multiplier=1.5,
        sample_rate=0.25,
        steps=40,
        privacy_unit="identity",
        relation="replace_one",
        sensitivity=1.0,
    )
    again = DpEvent.from_json(event.to_json())
    assert again == event and hash(again) == hash(event)
    assert again.privacy_unit is PrivacyUnit.IDENTITY and again.relation is Relation.REPLACE_ONE
    with pytest.raises(AttributeError):
        event.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [("noise_multiplier", -1.0), ("sample_rate", 0.0), ("sample_rate", 1.5), ("steps", -1), ("sensitivity", 0.0)],
)
def test_bad_event_names_the_field(field, value):
    args = dict(
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=10,
        privacy_unit="record",
        relation="add_or_remove",
        sensitivity=1.0,
    )
    with pytest.raises(ValueError, match=field):
        DpEvent(**{**args, field: value})


def test_missing_field_in_a_shipped_event_is_named():
    with pytest.raises(ValueError, match="missing field.*sample_rate"):
        DpEvent.from_dict(
            {
                "noise_multiplier": 1.0,
                "steps": 1,
                "privacy_unit": "record",
                "relation": "replace_one",
                "sensitivity": 1.0,
            }
        )
