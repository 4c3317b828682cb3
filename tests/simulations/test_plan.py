"""The round plan is the whole message a site reads: one schema, round-tripped, nothing else sent."""

from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.plan import RoundPlan, SharedFiles
from simulations.hospital_clip.server_app import train_config_record


def test_the_train_message_is_the_plan_and_reads_back_as_the_same_plan(tmp_path):
    cfg = SimulationConfig(output_dir=str(tmp_path / "run"), num_rounds=7, idia_queries=3, budget=6.0)
    record = dict(
        train_config_record(
            cfg,
            noise_multiplier=1.7,
            manifest="/m.csv",
            checkpoint="/c.pt",
            round_offset=2,
            declared_units="hospital_0=5",
            run_name="r1",
            gradient_canaries="{}",
        )
    )
    plan = RoundPlan.from_record(record, hash_key="k")
    assert plan.to_record() == record  # every key sent is a key of the plan, read back to the same value
    assert plan.dp.noise_multiplier == 1.7 and plan.round_offset == 2 and plan.run_name == "r1"
    assert plan.data == cfg.site_data() and plan.files == SharedFiles(
        manifest="/m.csv",
        checkpoint="/c.pt",
        site_state_root=str((tmp_path / "run" / "sites").resolve()),
        declared_units_map="hospital_0=5",
    )
    # the server's own settings stay with the server
    assert not {"num-rounds", "idia-queries", "budget", "site-budgets", "output-dir", "target-epsilon"} & set(record)


def test_a_deployment_sends_the_plan_without_any_path(tmp_path):
    (tmp_path / "server.csv").write_text("filepath,title\n")
    cfg = SimulationConfig(
        sites="hospital_a,hospital_b",
        manifest=str(tmp_path / "server.csv"),
        output_dir=str(tmp_path),
        declared_units=10,
    )
    record = dict(train_config_record(cfg, noise_multiplier=1.0, manifest="/server.csv", checkpoint="/c.pt"))
    assert RoundPlan.from_record(record, hash_key="k", declared_units=10).files is None
    assert not {"manifest", "checkpoint", "site-state-root", "site-policy-file"} & set(record)


def test_a_distributed_plan_carries_its_grid_and_share_and_each_adversary_sees_its_noise(tmp_path):
    import math

    from simulations.hospital_clip.plan import SecureSumPlan
    from simulations.hospital_clip.server_app import plan_secure_sum, secure_noise_multiplier

    cfg = SimulationConfig(
        output_dir=str(tmp_path / "run"),
        dp_mode="distributed",
        local_steps=1,
        num_sites=4,
        secure_agg_threshold=3,
        secure_agg_colluders=1,
        target_epsilon=2.0,
    )
    secure = plan_secure_sum(cfg, units={f"hospital_{k}": 250 for k in range(4)})
    assert secure.threshold == 3 and secure.bits == 29 and secure.level == "patient"
    record = dict(train_config_record(cfg, noise_multiplier=1.0, manifest="/m", checkpoint="/c", secure=secure))
    plan = RoundPlan.from_record(record, hash_key="k")
    assert plan.secure == secure and plan.to_record() == record
    # the server alone: threshold shares; with one colluder: two; a site trusting nobody: its own
    sigma = {a: plan.events(a)[0].noise_multiplier for a in ("server", "colluding", "own-share")}
    assert sigma["server"] == secure_noise_multiplier(secure)
    assert math.isclose(sigma["colluding"] / sigma["server"], math.sqrt(2 / 3))
    assert math.isclose(sigma["own-share"] / sigma["server"], math.sqrt(1 / 3))
    assert plan.guarantee().membership and "anywhere in the federation" in plan.guarantee().neighbours
    assert SecureSumPlan.from_record({}) is None  # a plan without a secure sum
