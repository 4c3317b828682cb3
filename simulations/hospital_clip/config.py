"""The app's run configuration: Flower run-config keys (kebab-case) parsed and validated once.

Every key has a default here; ``default.toml`` beside this file documents them for users and
``flwr run``. Unknown keys and wrong types fail before Ray starts, naming the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedclip.attacks.idia import DEFAULT_TEMPLATES, IdiaConfig
from fedclip.attacks.replies import REPLY_ROUNDS
from fedclip.data.names import NAME_LISTS
from fedclip.data.synthetic import SyntheticConfig
from fedclip.distributed.adversaries import check_colluders
from fedclip.models.factory import ModelConfig
from fedclip.privacy.accountant import OPACUS_ACCOUNTANTS
from fedclip.privacy.events import PrivacyUnit
from fedclip.privacy.modes import DP_MODES, INPUT_MODES
from fedclip.privacy.policy import load_policy_file
from fedclip.privacy.release import ReleaseConfig
from fedclip.privatize.plan import InputPlan
from fedclip.reporting.tracking import parse_backends
from fedclip.training.config import GRAD_ENGINES, DpConfig, TrainConfig
from simulations.hospital_clip.plan import RoundPlan, SiteData, parse_site_numbers
from strategies.registry import INNER_STRATEGIES
from strategies.secure_sum import check_secure_sum, max_bits

DEFAULT_TOML = Path(__file__).with_name("default.toml")
_DATA = SyntheticConfig()  # the data keys default to the generator's own defaults


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    num_rounds: int = 12
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    output_dir: str = "runs/hospital_clip"
    cache_dir: str = "runs/cache"
    resume: bool = False
    seed: int = 0
    # data
    manifest: str = ""
    num_sites: int = _DATA.num_sites
    patients_per_site: int = _DATA.patients_per_site
    public_patients: int = _DATA.public_patients
    heldout_patients: int = _DATA.heldout_patients
    # the first N held-out patients (by id) are the server's validation set, scored apart from the
    # test set (``validation_zero_shot_accuracy``): what ``fedclip tune`` selects on
    validation_patients: int = 0
    images_per_patient: int = _DATA.images_per_patient
    query_images_per_patient: int = _DATA.query_images_per_patient
    site_skew: float = _DATA.site_skew
    name_lists: str = _DATA.name_lists
    identity_strength: float = _DATA.identity_strength  # how strongly a patient's look marks their images
    canaries: int = _DATA.canaries  # canary patients for the one-run audit (each trains with probability 1/2)
    pool_sites: bool = False
    # deployment: the sites are declared, the server holds public and held-out rows only
    sites: str = ""  # "hospital_a,hospital_b": a deployment; "" = simulated sites from the data
    site_nodes: str = ""  # "hospital_a=<node id>,...": authenticated SuperNode ids (flwr supernode register)
    # the auditor's data (names and query photos of consenting targets); "" = in a simulation the
    # generated data, in a deployment no attack during the run (``fedclip audit`` later)
    audit_manifest: str = ""
    # the auditor's canary file (fedclip.data.canaries); "" = the generated data's, if it has canaries
    canary_file: str = ""
    # Dirac gradient canaries per site (fedclip.attacks.gradient_canaries): a white-box audit of the
    # mechanism; simulation only
    gradient_canaries: int = 0
    # model
    arch: str = "fedclip-tiny"
    pretrained: str = ""
    warm_start_epochs: int = 25
    trainable: str = "last-1"
    # local training and privacy
    dp_mode: str = "microbatch"
    privacy_unit: str = "identity"
    noise_multiplier: float = 1.0
    target_epsilon: float = 4.0
    budget: float = 4.0
    site_budgets: str = ""
    max_grad_norm: float = 1.0
    sample_rate: float = 0.1
    microbatch_size: int = 1  # units per micro-batch: 1 = every unit its own clipped term
    declared_units: int = 0  # public units per site, the DP sum's divisor; 0 = the synthetic plan's site sizes
    negative_bank_size: int = 256  # public negatives per unit in dp-mode "unit"
    # input-level privatization (dp-mode cadp | maskdp | mask-replace; fedclip.privatize)
    input_radius: float = 0.0  # clipping radius; 0 = cadp 1 / noise multiplier, maskdp 1
    input_images_per_unit: int = 0  # declared images per unit; 0 = the synthetic images-per-patient
    inn_epochs: int = 20  # cadp: epochs of the public INN's training
    input_image_size: int = 32  # pixels per side the privatizers work at (images are resized to it)
    identity_region: float = 1.0  # synthetic data: < 1 confines each look to a patch and writes masks
    delta: float = 1e-5
    accountant: str = "prv"
    local_steps: int = 20
    lr: float = 5e-3
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9)
    grad_engine: str = "auto"  # per-group gradients: hooks (one backward) | vmap (reference) | auto
    # what a site releases beside its update (0 = nothing; > 0: the noise multiplier, charged in the ledger)
    release_loss_noise: float = 0.0
    release_loss_bound: float = 10.0
    release_count_noise: float = 0.0
    # randomness: OS entropy at every site and round unless this is on (NOT private against the server)
    reproducible_noise: bool = False
    # simulated sites' own policies (a TOML file: [default] and one table per site); deployed sites use node config
    site_policy_file: str = ""
    # share of the selected sites that must train for a round to count; below it the run stops
    failure_quorum: float = 1.0
    round_timeout: float = 3600.0  # seconds a round waits for the sites' replies; a site silent past it is lost
    # simulation: messages pushed ahead of their replies (0 = all at once; a deployment always sends all)
    messages_in_flight: int = 8
    # overrides that must be deliberate (each is printed in summary.md)
    allow_large_delta: bool = False  # delta above 1/(units at the smallest site) makes epsilon meaningless
    allow_outside_paths: bool = False  # manifest image paths outside the manifest's folder
    # client-level DP at the server (a site is the unit): Flower's fixed-clipping wrapper
    client_dp_epsilon: float = 0.0
    client_clip_norm: float = 1.0
    # distributed DP over secure aggregation (dp-mode distributed; docs/privacy.md, "Distributed DP")
    secure_agg_threshold: int = 0  # sites that must stay for a round's sum to decode; 0 = every site
    secure_agg_colluders: int = 1  # sites assumed to collude with the server, for the 'colluding' epsilon
    secure_agg_bits: int = 0  # the secure sum's width; 0 = the widest Flower's SecAgg+ carries for the sites
    secure_agg_rounding: float = 0.01  # the share the grid's rounding adds to the sensitivity (coarser: narrower sum)
    secure_agg_neighbours: int = 0  # SecAgg+'s neighbours per site (odd); 0 = every site (SecAgg's complete graph)
    # client-level DP (client-dp-epsilon > 0) with its noise added in shares by the sites and summed by SecAgg+,
    # instead of by the server on clean updates
    secure_agg: bool = False
    evaluate_every: int = 1  # evaluate and attack the global model every this many rounds (and after the last)
    # attack
    idia_queries: int = 5
    idia_tau: int = 1
    idia_templates: str = "|".join(DEFAULT_TEMPLATES)
    idia_distractors: int = 200
    # the server as the adversary: IDIA on each site's own reply (final | every | off), beside the
    # attack on the global model; "every" costs one attack per site and round
    attack_replies: str = "final"
    # likelihood-ratio attacks (fedclip.attacks.likelihood_ratio), beside IDIA on the same targets
    lira: bool = True
    lira_records: int = 500  # member and non-member records each, sampled from the auditor's manifest
    # the attacker's reference models (fedclip.attacks.reference_models): 0 = the base model alone
    lira_references: int = 0
    # experiment tracking (fedclip.reporting.tracking): "tensorboard", "mlflow", both (comma list) or "none"
    tracking: str = "tensorboard"
    mlflow_uri: str = ""  # "" = sqlite:///<output-dir's parent>/mlflow.db (a local file, no server)
    experiment: str = ""  # the MLflow experiment; "" = hospital_clip (fedclip compare and tune name their own)
    run_label: str = ""  # the run's name in MLflow; "" = the output folder's name

    def __post_init__(self) -> None:
        for key, allowed in (
            ("dp_mode", DP_MODES),
            ("privacy_unit", tuple(PrivacyUnit)),
            ("accountant", OPACUS_ACCOUNTANTS),
            ("name_lists", tuple(NAME_LISTS)),
            ("grad_engine", GRAD_ENGINES),
            ("attack_replies", REPLY_ROUNDS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key.replace('_', '-')}: expected one of {[str(a) for a in allowed]}, got {getattr(self, key)!r}"
                )
        for key in (
            "target_epsilon",
            "noise_multiplier",
            "client_dp_epsilon",
            "lr",
            "max_grad_norm",
            "sample_rate",
            "delta",
            "client_clip_norm",
            "release_loss_noise",
            "release_loss_bound",
            "release_count_noise",
            "site_skew",
        ):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key.replace('_', '-')}: expected a finite number, got {getattr(self, key)}")
        if self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed}")
        if self.num_rounds < 1:
            raise ValueError(f"num-rounds: expected an integer >= 1, got {self.num_rounds}")
        if self.warm_start_epochs < 1 and not self.pretrained:
            raise ValueError(
                f"warm-start-epochs: expected an integer >= 1 (the base model is warm-started on the public "
                f"patients), got {self.warm_start_epochs}; or give pretrained = a checkpoint file or tag"
            )
        if self.strategy not in INNER_STRATEGIES:
            raise ValueError(f"strategy: expected one of {sorted(INNER_STRATEGIES)}, got {self.strategy!r}")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train: expected a value in (0, 1], got {self.fraction_train}")
        if self.target_epsilon < 0:
            raise ValueError(
                f"target-epsilon: expected 0 (use noise-multiplier) or a value > 0, got {self.target_epsilon}"
            )
        if self.client_dp_epsilon < 0:
            raise ValueError(f"client-dp-epsilon: expected 0 (off) or a value > 0, got {self.client_dp_epsilon}")
        if self.client_dp_epsilon > 0 and (
            self.fraction_train != 1.0 or self.strategy != "fedavg" or math.isfinite(self.budget) or self.site_budgets
        ):
            raise ValueError(
                "client-dp-epsilon: client-level DP runs every site every round over fedavg (its "
                "accounting claims no sampling amplification), so it needs fraction-train = 1.0, "
                "strategy = 'fedavg', budget = inf and no site-budgets"
            )
        if not self.client_clip_norm > 0:
            raise ValueError(f"client-clip-norm: expected a value > 0, got {self.client_clip_norm}")
        if not self.budget > 0:
            raise ValueError(f"budget: expected an epsilon > 0 (or inf), got {self.budget}")
        if self.manifest and not Path(self.manifest).is_file():
            raise ValueError(f"manifest: file not found: {self.manifest}")
        self.site_budget_map()
        self._check_attacks()
        self._check_validation()
        self.tracking_backends()
        self._check_deployment()
        if self.dp_mode in INPUT_MODES:
            self._check_input_mode()
        elif self.dp_mode != "nonprivate" and self.noise_multiplier <= 0 and self.target_epsilon <= 0:
            raise ValueError("noise-multiplier: expected > 0 (or set target-epsilon) with a private dp-mode")
        if self.site_policy_file:
            if not Path(self.site_policy_file).is_file():
                raise ValueError(f"site-policy-file: file not found: {self.site_policy_file}")
            load_policy_file(self.site_policy_file, delta=self.delta)
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout: expected seconds > 0, got {self.round_timeout}")
        if not 0 < self.failure_quorum <= 1:
            raise ValueError(f"failure-quorum: expected a share in (0, 1], got {self.failure_quorum}")
        if self.messages_in_flight < 0:
            raise ValueError(
                f"messages-in-flight: expected an integer >= 0 (0 = all at once), got {self.messages_in_flight}"
            )
        if self.evaluate_every < 1:
            raise ValueError(f"evaluate-every: expected an integer >= 1, got {self.evaluate_every}")
        if self.secure_agg and self.dp_mode != "distributed" and self.client_dp_epsilon <= 0:
            raise ValueError(
                "secure-agg: sums the sites' shares of client-level noise; set client-dp-epsilon > 0 "
                "(or dp-mode = 'distributed', which always sums over secure aggregation)"
            )
        if self.secure_level:
            self.secure_sum_settings()
        # building the parts validates their own fields
        self.synthetic(), self.model(), self.dp(), self.train(), self.idia(), self.release()

    def site_count(self) -> int:
        return len(self.declared_sites()) if self.deployment else (1 if self.pool_sites else self.num_sites)

    @property
    def secure_level(self) -> str:
        """What a secure sum protects: "patient" (dp-mode distributed: one DP-SGD step over all
        sites), "site" (client-level DP's noise in shares: secure-agg), or "" (no secure sum)."""
        if self.dp_mode == "distributed":
            return "patient"
        return "site" if self.secure_agg and self.client_dp_epsilon > 0 else ""

    def secure_sum_settings(self) -> tuple[int, int, int]:
        """A secure sum's (bits, threshold, colluders), resolved and checked, naming the key."""
        if self.secure_level == "patient":
            self._check_patient_level_sum()
        sites = self.site_count()
        if sites < 2:
            raise ValueError(f"num-sites: secure aggregation needs at least 2 sites, got {sites}")
        threshold = self.secure_agg_threshold or sites
        bits = self.secure_agg_bits or max_bits(sites)
        check_secure_sum(num_sites=sites, bits=bits, threshold=threshold, neighbours=self.secure_agg_neighbours)
        check_colluders(self.secure_agg_colluders, threshold=threshold)
        if not 0 < self.secure_agg_rounding <= 1:
            raise ValueError(f"secure-agg-rounding: expected a share in (0, 1], got {self.secure_agg_rounding}")
        return bits, threshold, self.secure_agg_colluders

    def _check_patient_level_sum(self) -> None:
        if self.local_steps != 1:
            raise ValueError(
                f"local-steps: dp-mode 'distributed' is one DP-SGD step over all sites per round (after several local "
                f"steps a site's update is not linear in its data, and the others' noise would not cover it); "
                f"expected 1, got {self.local_steps} (set num-rounds to the steps)"
            )
        for key, bad in (
            ("pool-sites", self.pool_sites),
            ("client-dp-epsilon", self.client_dp_epsilon > 0),
            ("release-loss-noise", self.release_loss_noise > 0),
            ("release-count-noise", self.release_count_noise > 0),
            ("gradient-canaries", self.gradient_canaries > 0),
        ):
            if bad:
                raise ValueError(f"{key}: not available with dp-mode 'distributed' (leave it at its default)")
        if self.fraction_train != 1.0:
            raise ValueError(
                "fraction-train: dp-mode 'distributed' samples units at every site (Poisson, sample-rate); "
                f"every site takes part in every round, expected 1.0, got {self.fraction_train}"
            )

    def _check_input_mode(self) -> None:
        if self.dp_mode != "mask-replace" and self.target_epsilon <= 0:
            raise ValueError(
                f"target-epsilon: dp-mode {self.dp_mode!r} privatizes the images once to this epsilon "
                "per unit; expected a value > 0"
            )
        smallest = min([self.budget, *self.site_budget_map().values()])
        if self.dp_mode != "mask-replace" and self.target_epsilon > smallest:
            raise ValueError(
                f"budget: dp-mode {self.dp_mode!r} spends target-epsilon {self.target_epsilon:g} at once, "
                f"above the budget {smallest:g}: no site could ever train; raise budget (or site-budgets) "
                "or lower target-epsilon"
            )
        if self.input_radius < 0 or not math.isfinite(self.input_radius):
            raise ValueError(f"input-radius: expected 0 (automatic) or a finite radius > 0, got {self.input_radius}")
        if self.input_images_per_unit < 0:
            raise ValueError(
                f"input-images-per-unit: expected 0 (the synthetic images-per-patient) or >= 1, "
                f"got {self.input_images_per_unit}"
            )
        if self.manifest and self.privacy_unit == "identity" and not self.input_images_per_unit:
            raise ValueError(
                "input-images-per-unit: with your own manifest, declare the most training images one "
                "patient may have (the guarantee is stated for it; counting them would use the data)"
            )
        if self.deployment:
            raise ValueError(
                f"dp-mode {self.dp_mode!r}: simulation only for now (each hospital would need the public "
                "INN and its own privatize step on its SuperNode)"
            )
        if self.input_image_size < 8 or self.input_image_size % 4:
            raise ValueError(f"input-image-size: expected a multiple of 4, >= 8, got {self.input_image_size}")
        if self.inn_epochs < 1:
            raise ValueError(f"inn-epochs: expected an integer >= 1, got {self.inn_epochs}")

    def images_per_unit(self) -> int:
        """What an input privatization's epsilon is stated for: a record is one image."""
        if self.privacy_unit == "record":
            return 1
        return self.input_images_per_unit or self.images_per_patient

    @property
    def deployment(self) -> bool:
        """A deployment: sites are declared, not derived from data the server holds."""
        return bool(self.sites.strip())

    def declared_sites(self) -> tuple[str, ...]:
        """``sites = "hospital_a,hospital_b"``. Names, not a count: with a count any node could
        claim any name, and the server could not refuse a stranger."""
        names = tuple(s.strip() for s in self.sites.split(",") if s.strip())
        if any(n.isdigit() for n in names):
            raise ValueError(
                f"sites: expected the sites' names ('hospital_a,hospital_b'), got {self.sites!r}; a count "
                "is not accepted: the server must know whom to expect, to refuse a node claiming another name"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"sites: a name appears twice in {self.sites!r}")
        return names

    def site_node_map(self) -> dict[str, int]:
        """``site-nodes = "hospital_a=123,hospital_b=456"``: the SuperLink's node id of each site."""
        out = parse_site_numbers(self.site_nodes, key="site-nodes")
        if len(set(out.values())) != len(out):
            raise ValueError(f"site-nodes: one node id is mapped to two sites in {self.site_nodes!r}")
        return out

    def tracking_backends(self) -> tuple[str, ...]:
        return parse_backends(self.tracking)

    def tracking_names(self) -> tuple[str, str, str]:
        """(MLflow store, experiment, run name), the defaults resolved."""
        out = Path(self.output_dir)
        uri = self.mlflow_uri or f"sqlite:///{(out.parent / 'mlflow.db').resolve()}"
        return uri, self.experiment or "hospital_clip", self.run_label or out.name

    def _check_validation(self) -> None:
        if self.validation_patients < 0:
            raise ValueError(f"validation-patients: expected an integer >= 0, got {self.validation_patients}")
        if not self.manifest and self.validation_patients >= self.heldout_patients:
            raise ValueError(
                f"validation-patients: {self.validation_patients} of heldout-patients = {self.heldout_patients}; "
                "keep some held-out patients for the test set (validation-patients below heldout-patients)"
            )

    def _check_attacks(self) -> None:
        """The attack and audit keys, checked before any data is made or Ray starts."""
        if not self.manifest and not self.audit_manifest and self.idia_queries > self.query_images_per_patient:
            raise ValueError(
                f"idia-queries: {self.idia_queries} query images per person, but the generated data has "
                f"query-images-per-patient = {self.query_images_per_patient}; raise it or lower idia-queries"
            )
        if self.audit_manifest and not Path(self.audit_manifest).is_file():
            raise ValueError(f"audit-manifest: file not found: {self.audit_manifest}")
        if self.canary_file and not Path(self.canary_file).is_file():
            raise ValueError(f"canary-file: file not found: {self.canary_file}")
        if self.lira_records < 1:
            raise ValueError(f"lira-records: expected an integer >= 1 records per side, got {self.lira_records}")
        if self.lira_references < 0:
            raise ValueError(
                f"lira-references: expected an integer >= 0 reference models (0: the base model), got {self.lira_references}"
            )
        if self.lira_references and self.dp_mode == "distributed":
            raise ValueError(
                "lira-references: a reference model repeats one site's local training, and dp-mode distributed "
                "has none (each round is one DP-SGD step over every site); set lira-references = 0"
            )
        if self.lira_references and self.deployment:
            raise ValueError(
                "lira-references: simulation only (the server trains them on the generated public population); "
                "an auditor of a deployment attacks the saved models with fedclip audit"
            )
        if self.gradient_canaries < 0:
            raise ValueError(f"gradient-canaries: expected an integer >= 0 per site, got {self.gradient_canaries}")
        if self.gradient_canaries and self.deployment:
            raise ValueError(
                "gradient-canaries: simulation only (a hospital would have to run the auditor's canaries "
                "in its own training); audit a deployment with data canaries (canary-file)"
            )

    def _check_deployment(self) -> None:
        nodes = self.site_node_map()
        if not self.deployment:
            if nodes:
                raise ValueError("site-nodes: only meaningful in a deployment; declare the sites with 'sites' too")
            return
        sites = self.declared_sites()
        if not self.manifest:
            raise ValueError(
                "manifest: a deployment (sites = ...) needs the server's own manifest of public and "
                "held-out rows (the warm start and the held-out evaluation use them)"
            )
        if self.pool_sites:
            raise ValueError("pool-sites: pooling is a simulation of central training; a deployment declares its sites")
        unknown, missing = sorted(set(nodes) - set(sites)), sorted(set(sites) - set(nodes))
        if unknown:
            raise ValueError(f"site-nodes: {unknown} not among the declared sites {list(sites)}")
        if nodes and missing:
            raise ValueError(f"site-nodes: no node id for {missing}; map every declared site, or none")

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(
            seed=self.seed,
            num_sites=self.num_sites,
            patients_per_site=self.patients_per_site,
            public_patients=self.public_patients,
            heldout_patients=self.heldout_patients,
            images_per_patient=self.images_per_patient,
            query_images_per_patient=self.query_images_per_patient,
            site_skew=self.site_skew,
            name_lists=self.name_lists,
            canaries=self.canaries,
            identity_region=self.identity_region,
            identity_strength=self.identity_strength,
        )

    def model(self, pretrained: str | None = None) -> ModelConfig:
        return ModelConfig(
            arch=self.arch, pretrained=self.pretrained if pretrained is None else pretrained, trainable=self.trainable
        )

    def planned_units(self) -> int:
        """Units per site as the synthetic plan sets them (before any skew)."""
        return self.patients_per_site * (1 if self.privacy_unit == "identity" else self.images_per_patient)

    def dp(self, noise_multiplier: float | None = None, declared_units: int | None = None) -> DpConfig:
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        mode = "nonprivate" if self.dp_mode in INPUT_MODES else self.dp_mode  # training on privatized inputs
        return DpConfig(
            mode=mode,
            privacy_unit=self.privacy_unit,
            noise_multiplier=sigma,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            microbatch_size=self.microbatch_size,
            declared_units=declared_units or self.declared_units or self.planned_units(),
            delta=self.delta,
            accountant=self.accountant,
        )

    def train(self) -> TrainConfig:
        return TrainConfig(
            steps=self.local_steps,
            lr=self.lr,
            optimizer=self.optimizer,
            negative_bank_size=self.negative_bank_size,
            grad_engine=self.grad_engine,
        )

    def release(self) -> ReleaseConfig:
        return ReleaseConfig(
            loss_noise=self.release_loss_noise, loss_bound=self.release_loss_bound, count_noise=self.release_count_noise
        )

    def site_data(self) -> SiteData:
        return SiteData(
            arch=self.arch,
            trainable=self.trainable,
            num_sites=self.num_sites,
            pool_sites=self.pool_sites,
            allow_outside_paths=self.allow_outside_paths,
        )

    def round_plan(self, noise_multiplier: float, input_plan: InputPlan | None = None) -> RoundPlan:
        """What every site is asked to run each round, with the resolved noise multiplier."""
        return RoundPlan(
            dp=self.dp(noise_multiplier=noise_multiplier),
            train=self.train(),
            release=self.release(),
            reproducible_noise=self.reproducible_noise,
            seed=self.seed,
            input=input_plan,
            data=self.site_data(),
        )

    def idia(self) -> IdiaConfig:
        return IdiaConfig(
            num_queries=self.idia_queries,
            tau=self.idia_tau,
            templates=tuple(t for t in self.idia_templates.split("|") if t),
            num_distractors=self.idia_distractors,
            seed=self.seed,
            name_lists=self.name_lists,
        )

    def site_budget_map(self) -> dict[str, float]:
        """``site-budgets = "hospital_0=2.0,hospital_1=8"``: per-site budgets over ``budget``."""
        out: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in self.site_budgets.split(","))):
            site, sep, value = item.partition("=")
            try:
                out[site.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not site.strip() or not out.get(site.strip(), 0) > 0:
                raise ValueError(f"site-budgets: expected 'site=epsilon,...' with epsilon > 0, got {item!r}")
        return out

    def budget_of(self, site: str) -> float:
        return self.site_budget_map().get(site, self.budget)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> "SimulationConfig":
        """Parse Flower run-config values (kebab-case keys; bool, int, float or str)."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"{key}: unknown run-config key; known keys: {sorted(k.replace('_', '-') for k in known)}"
                )
            kwargs[name] = _coerce(key, value, type(_DEFAULTS[name]))
        return cls(**kwargs)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TOML run config: {exc}") from exc
    return data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)


_DEFAULTS = {f.name: f.default for f in fields(SimulationConfig)}
