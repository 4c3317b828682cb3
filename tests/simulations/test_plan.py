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
