"""The federation's one typed config, the one source of every setting's name, default and help.

`FederationConfig` holds a few top-level settings and one torch-free section per concern
(`data`, `schedule`, `scheme`, `robust`, `privacy`, `training`, `emulator`, `compression`,
`evaluation`), each a frozen dataclass whose fields carry their help (and their flag, and their
flat key, where those are not the field's name) in their metadata (`soppu.settings.setting`,
as PEFT's configs do). Python code reads `config.training.local_steps`.

Flower's run config is flat, so the config flattens only there: `flat()` (field keys, `_`) and
`to_run_config()` (`-`) write it, `from_run_config()` reads it back (run.json, `--config`,
`[tool.flwr.app.config]`, which is `to_toml()`; a test proves pyproject's is). A key is its
field's name, or the `key` its metadata gives (`compress_rank` for `compression.rank`), so
run folders written before the sections still load. `soppu simulate`'s flags are the keys, but
for the few with their own `flag`. Empty strings and zeros mean "the default" where a run
config cannot hold None.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from soppu.compression.methods import HELP as METHOD_HELP
from soppu.data import DataOptions  # torch-free, as this module is
from soppu.settings import flag as field_flag
from soppu.settings import key as field_key
from soppu.settings import same_as, setting
from soppu.train_config import LORA_LAYERS, TrainConfig

if TYPE_CHECKING:  # imported where used: `soppu --help` reads this module without torch
    from soppu.compression.compress import CompressionConfig
    from soppu.emulator import EmulatorPlan

# server/schemes/ (not imported here: no torch)
SCHEMES = ("fedavg-ft", "local", "fedsa", "ditto", "local-prox")
LEGACY_AGGREGATION = {"fedavg": "fedavg-ft", "none": "local"}  # run folders before `scheme`
LOG_SINKS = ("tensorboard", "mlflow")  # soppu/server/tracking.py
CLIENT_MODES = ("emulator", "full", "split")


@dataclass(frozen=True)
class ModeRecipe:
    """What a client mode trains with where the settings leave it open (lr 0, ''): its lr and
    schedule within a round and its LoRA's targets (None: the architecture's attention q and
    v, `soppu.basemodel`)."""

    lr: float
    schedule: str
    targets: tuple[str, ...] | None


# Emulator and split mode put the LoRA on all projections of every layer the client holds
# (the emulator's top `soppu.emulator.EXACT_TOP` exact, as many stand-ins below), full mode on
# q/v of every layer; each at a constant 1e-3. On the emulator that replaced q/v on 16 layers
# (2 exact, 14 stand-ins) at 1.5e-3 with a warm-up: 3.4–12.0 points more on each of the four
# populations measured (docs/benchmarks.md, "Exact top layers on the emulator"); on the full model
# 1.5e-3 left the personal adapter behind the global one for 6 of 16 users and a constant 1e-3
# for 3 (28.8% gain against 29.9%).
MODE_RECIPES = {
    "emulator": ModeRecipe(1e-3, "constant", ("all-linear",)),
    "full": ModeRecipe(1e-3, "constant", None),
    "split": ModeRecipe(1e-3, "constant", ("all-linear",)),
}
# what an unset --target-modules means, for every help text that says it
MODE_TARGETS_HELP = "the client mode's: " + "; ".join(
    f"{mode} {','.join(recipe.targets) if recipe.targets else 'attention q and v'}"
    for mode, recipe in MODE_RECIPES.items()
)
DEVICES = ("cpu", "cuda")


def _check_one_of(section: Any, allowed: dict[str, tuple[str, ...]]) -> None:
    """Each named field of `section` holds one of its allowed values, or a ValueError names
    the field by its flat key."""
    for name, values in allowed.items():
        if getattr(section, name) not in values:
            key = field_key(next(f for f in fields(section) if f.name == name))
            raise ValueError(
                f"{key.replace('_', '-')} must be one of {values}, got {getattr(section, name)!r}"
            )


@dataclass(frozen=True)
class DataSettings:
    """Whose text, and how each user's is split."""

    source: str = setting(
        "",
        "Users' text: a JSONL/CSV/Parquet file, hf:DATASET[@SUBSET] or py:MODULE:FUNCTION ('': the"
        " embedded Shakespeare roles).",
        key="data",
    )
    users: int = setting(8, "Users (nodes): those with the most text; 0: all.")
    # read as one user's are (soppu personalize, soppu data): the same settings
    user_column: str = same_as(DataOptions, "user_column")
    text_column: str = same_as(DataOptions, "text_column")
    min_chars: int = same_as(DataOptions, "min_chars")
    test_fraction: float = same_as(DataOptions, "test_fraction")
    # the share before the held-out part on which each user's served adapter is chosen
    # (personal, global or none); 0: no choice, every user is served their personal adapter
    validation_fraction: float = setting(
        0.1,
        "Share before the held-out part on which each user's served adapter is chosen (personal, "
        "global or none); 0: serve the personal one unchosen.",
    )

    def __post_init__(self) -> None:
        if self.users < 0:
            raise ValueError(f"users must be ≥ 0 (0: all), got {self.users}")

    def options(self, seed: int) -> DataOptions:
        return DataOptions(
            user_column=self.user_column,
            text_column=self.text_column,
            min_chars=self.min_chars,
            test_fraction=self.test_fraction,
            validation_fraction=self.validation_fraction,
            seed=seed,
        )


@dataclass(frozen=True)
class RoundSchedule:
    """How many rounds, who trains in each, and how long the server waits."""

    rounds: int = setting(2, "Federated rounds.")
    fraction_train: float = setting(1.0, "Share of the users trained each round.")
    min_train_nodes: int = setting(1, "At least this many users trained each round.")
    fraction_evaluate: float = setting(
        0.0,
        "Share of the users evaluated on the emulator each round.",
    )
    round_timeout: float = setting(3600.0, "Seconds a round waits for replies.")
    node_wait: float = setting(120.0, "Seconds to wait for the nodes to connect.")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.min_train_nodes < 1:
            raise ValueError(f"min-train-nodes must be ≥ 1, got {self.min_train_nodes}")


@dataclass(frozen=True)
class SchemeSettings:
    """What users start from, what is averaged, what stays personal (server/schemes/)."""

    name: str = setting(
        "local-prox",
        "local-prox (own, pulled to the global, which is their average), fedavg-ft (from the "
        "global adapter each round), local (own only), fedsa (A shared, B personal) or ditto "
        "(personal pulled to the global by prox, beside a shared copy).",
        key="scheme",
    )
    prox: float = setting(
        0.01,
        "ditto, local-prox: the pull prox/2·‖P − G‖² of each personal adapter to the global one.",
    )
    # after the last round every user fine-tunes the final global adapter for up to this many
    # steps, keeping the step best on their validation split (0: no pass)
    personal_pass: int = setting(
        0,
        "After the last round, each user fine-tunes the global adapter for up to this many steps, "
        "keeping the step best on their validation text; 0: no pass.",
    )
    personal_pass_lr: float = setting(3e-4, "The personal pass's learning rate (constant).")
    personal_pass_check: int = setting(
        5,
        "The personal pass checks validation loss every this many steps.",
    )

    def __post_init__(self) -> None:
        _check_one_of(self, {"name": SCHEMES})
        if not (self.prox >= 0 and self.prox < float("inf")):
            raise ValueError(f"prox must be finite and ≥ 0, got {self.prox}")
        if self.personal_pass < 0 or self.personal_pass_check < 1:
            raise ValueError("personal-pass must be ≥ 0 and personal-pass-check ≥ 1")


@dataclass(frozen=True)
class RobustMean:
    """The robust mean of replies (soppu/server/schemes/aggregate.py): updates clipped to clip ×
    the round's median norm, num-examples capped at weight_cap × the round's median (0: off);
    trim: the share of replies left out at each end of every coordinate (0.5: the median)."""

    clip: float = setting(
        1.0,
        "Robust mean: updates clipped to this × the round's median update norm; 0: off.",
    )
    weight_cap: float = setting(
        4.0,
        "Robust mean: num-examples capped at this × the round's median; 0: off.",
    )
    trim: float = setting(
        0.5,
        "Robust mean: share of replies left out at each end per weight; 0.5: median.",
    )

    def __post_init__(self) -> None:
        for name in ("clip", "weight_cap"):
            value = getattr(self, name)
            if not (value == 0 or 1 <= value < float("inf")):
                key = name.replace("_", "-")
                raise ValueError(f"{key} must be 0 (off) or a finite factor ≥ 1, got {value}")
        if not 0 <= self.trim <= 0.5:
            raise ValueError(f"trim must be a share in [0, 0.5] (0.5: the median), got {self.trim}")


@dataclass(frozen=True)
class CentralDP:
    """Central differential privacy on the global adapter (soppu/server/schemes/privacy.py):
    updates clipped to `clip`, averaged unweighted, Gaussian noise `noise` × `clip` / n; it
    replaces the robust mean; ε at `delta` is logged and recorded each round."""

    noise: float = setting(
        0.0,
        "Central DP on the global adapter: noise multiplier (0: off; replaces the robust mean).",
        key="dp_noise",
    )
    clip: float = setting(
        0.0, "Central DP: every user's update clipped to this L2 norm.", key="dp_clip"
    )
    delta: float = setting(1e-5, "Central DP: the δ at which ε is reported.", key="dp_delta")

    def __post_init__(self) -> None:
        if not 0 <= self.noise < float("inf"):
            raise ValueError(f"dp-noise must be 0 (off) or a finite multiplier > 0: {self.noise}")
        if self.noise and not (0 < self.clip < float("inf") and 0 < self.delta < 1):
            raise ValueError(
                f"central DP needs a finite dp-clip > 0 and dp-delta in (0, 1), got "
                f"{self.clip}, {self.delta}"
            )


@dataclass(frozen=True)
class ClientTraining:
    """Each client's LoRA and its steps in a round (`FederationConfig.train` makes the round's
    `TrainConfig` of it)."""

    # per round: the main job's 8 users × 2 rounds train in about 6 minutes on 2 cores
    local_steps: int = setting(15, "Client training steps per round.")
    # 0 and "": the client mode's (MODE_RECIPES)
    lr: float = setting(0.0, "Client learning rate; 0: the client mode's (1e-3 in each).")
    lr_scheduler_type: str = setting(
        "",
        "Client lr schedule, each round: constant, constant_with_warmup, linear, cosine; '': the "
        "client mode's (constant in each).",
    )
    warmup_steps: int = setting(
        3,
        "Client lr warm-up steps from 0, each round, at most local-steps − 1 (constant ignores "
        "it).",
    )
    # each round's TrainConfig (`FederationConfig.train`): the same knobs
    batch_size: int = same_as(TrainConfig, "batch_size")
    seq_len: int = same_as(TrainConfig, "seq_len")
    lora_rank: int = same_as(TrainConfig, "rank")
    lora_alpha: float = same_as(TrainConfig, "alpha")
    target_modules: str = setting(
        "",
        f"LoRA targets, comma-separated, or all-linear ('': {MODE_TARGETS_HELP}).",
    )
    lora_layers: str = same_as(TrainConfig, "lora_layers")
    max_eval_tokens: int = setting(
        2048,
        "Held-out tokens each client checks its adapter on (emulator).",
    )

    def __post_init__(self) -> None:
        _check_one_of(self, {"lora_layers": LORA_LAYERS})

    @property
    def targets(self) -> tuple[str, ...] | None:
        names = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        return names or None


@dataclass(frozen=True)
class EmulatorSettings:
    """The clients' compressed model (FedBiOT), its alignment and the gradient correction."""

    path: str = setting("", "An emulator folder ('': build one and cache it).", key="emulator")
    top: int = setting(0, "Adapter layers: the last N (0: 8, or a third of a smaller model).")
    bottom: int = setting(0, "Adapter layers: also the first N.")
    drop: float = setting(0.64, "Share of the middle layers the emulator drops.")
    layer_select: str = setting(
        "importance",
        "Middle layers the emulator keeps: importance or even.",
    )
    align_steps: int = setting(
        -1,
        "Emulator alignment steps; -1: the public text's default (240 on generated text, "
        "60 on the pool or a file); 0: none.",
    )
    # FedBiOT's bi-level step: with the adapter in both models the emulator's middle layers
    # learn to pass on what the full model does with it (experiments/realign_probe.py)
    realign_steps: int = setting(
        0,
        "Re-align the emulator for N steps before every round after the first, the round's "
        "starting adapter in it and in the full model; clients then fetch it anew; 0: off.",
    )
    # text no user owns, to align the emulator and correct gradients on: "generated" (the full
    # model's own samples), "pool" (the embedded Shakespeare pool), or a file; "": the default
    public: str = setting(
        "",
        "Text no user owns, to align and correct on: generated (the full model's own samples), "
        "pool (the embedded Shakespeare pool) or a file with a 'text' column; '': the default.",
    )
    correction_batches: int = setting(
        8,
        "Public batches for each round's gradient correction; 0: off.",
    )
    # soppu/repair.py. Off: it buys a point on code and sympy for ~100 s and up to 1 GB per
    # client, undoes itself on the roles (unchecked it cost them 2.3 points), serves Django's
    # translators 1.5 points less, and asks every real node for a teacher (benchmarks)
    repair_steps: int = setting(
        0,
        "Each client first tunes its emulator on its own text towards what scoring that text "
        "through the serving API answers (top-5 logprobs), N steps, once per emulator; 0: off.",
    )
    repair_lr: float = setting(3e-4, "The clients' emulator repair: its lr (AdamW).")
    # "pass": the rounds (and so the global adapter every user shares) train on the emulator
    # as sent; only each user's final personal pass trains on their repaired one
    repair_for: str = setting(
        "rounds",
        "Where clients train on their repaired emulator: rounds (every round and the personal "
        "pass) or pass (only the final personal pass; the global adapter never sees a repair).",
    )

    def __post_init__(self) -> None:
        _check_one_of(
            self,
            {"layer_select": ("importance", "even"), "repair_for": ("rounds", "pass")},
        )  # layer_select: soppu.emulator.SELECTIONS
        if not 0 <= self.repair_steps <= 100_000:
            raise ValueError(f"repair-steps must be in [0, 100000] (0: off): {self.repair_steps}")
        if not (math.isfinite(self.repair_lr) and 0 < self.repair_lr <= 1):
            raise ValueError(f"repair-lr must be in (0, 1], got {self.repair_lr}")
        if self.correction_batches < 0:
            raise ValueError(f"correction-batches must be ≥ 0, got {self.correction_batches}")
        if self.align_steps < -1:
            raise ValueError(
                f"align-steps must be ≥ 0, or -1 for the default, got {self.align_steps}"
            )
        if self.realign_steps < 0:
            raise ValueError(f"realign-steps must be ≥ 0 (0: off), got {self.realign_steps}")


@dataclass(frozen=True)
class CompressionSettings:
    """How the server compresses every user's adapter, and when (soppu.compression)."""

    every: int = setting(
        0, "Compress every K rounds; 0: after the last only.", key="compress_every"
    )
    rank: int = setting(
        0,
        "Compression: shared rank per slot; 0: choose by --energy.",
        flag="rank",
        key="compress_rank",
    )
    # 0.97 and 4 bits (Huffman-coded), measured (experiments/compression_defaults.py, name
    # s18-deflate) on local-prox's adapters of six populations: 23.3–38.3× the float32
    # adapters, keeping 91.0–103.9% (median over the users whose personal gain over the global
    # adapter is significant) of that gain and 98–102% of the gain over the base model; 0.975
    # and 0.98 kept no more where shares are tight (the roles). The 4-bit codes double the
    # reconstruction error (≈ 0.27 against 0.14) but not the loss of gain
    energy: float = setting(
        0.97,
        "Compression: share of the energy kept (when no --rank).",
        flag="energy",
        key="compress_energy",
    )
    sigma: str = setting(
        "full",
        f"Compression: the per-user core, {METHOD_HELP}",
        flag="sigma",
        key="compress_sigma",
    )
    bits: int = setting(
        4,
        "Compression: 32, or 8/4 (bases and cores stored as integer codes).",
        flag="bits",
        key="compress_bits",
    )
    clusters: int = setting(
        1,
        "Compression: bases per slot; 0: choose 1–4 per slot.",
        flag="clusters",
        key="compress_clusters",
    )
    # norm: every user counts alike, so no one user's norm (a hostile reply scaled ×1e4) can
    # take the shared bases; measured on three populations it costs 1–2% of the storage ratio
    # and nothing of what users keep (docs/benchmarks.md, "Compression weights")
    weights: str = setting(
        "norm",
        "Compression: uniform, or norm (every user counts alike).",
        flag="weights",
        key="compress_weights",
    )
    group: str = setting(
        "slot",
        "Compression: slot (a basis per layer and module) or shape.",
        flag="group",
        key="compress_group",
    )
    # users who join after a compression round are projected onto its bases; a slot whose
    # new users carry more than this share of their energy outside its bases is refit
    refit_above: float = setting(
        0.2,
        "Refit a slot when users joining carry more energy outside it.",
        key="compress_refit_above",
    )
    export_rank: int = setting(0, "Serving rank of the published adapters; 0: exact.")

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"compress-every must be ≥ 0, got {self.every}")
        self.to_config("cpu")  # validates the compression settings now, not after training

    def to_config(self, device: str) -> CompressionConfig:
        from soppu.compression.compress import CompressionConfig

        return CompressionConfig(
            rank=self.rank or None,
            energy=None if self.rank else self.energy,
            sigma=self.sigma,
            bits=self.bits,
            clusters=self.clusters,
            weights=self.weights,
            group=self.group,
            device=device,
        )


@dataclass(frozen=True)
class EvaluationSettings:
    """The server's judgement on the full model: the final evaluation and the served choice."""

    final_evaluation: bool = setting(True, "Per-user perplexities on the full model after the run.")
    # held-out tokens per user in the final evaluation, validation tokens in the served choice;
    # enough for intervals that tell a win from noise (0: all of them)
    final_eval_tokens: int = setting(
        8192,
        "Held-out (validation) tokens per user in the final evaluation (the served choice) on the "
        "full model; 0: all.",
    )
    # an emulator-trained adapter moves the full model by another amount than it moved the
    # emulator: measured on three populations (experiments/adapter_scale.py), λ chosen per
    # user on validation was significantly better for 9 of 18 users and worse for none
    serve_scales: str = setting(
        "0.5,0.75,1,1.25",
        "Strengths λ (λ·ΔW) at which each adapter may be served, comma-separated; the choice "
        "walks them from 1 while the validation loss falls; '1': as trained only. In emulator "
        "mode a strength below 1 scales the layers the emulator stands in for, not its exact "
        "top layers.",
    )

    # replayed on 58 users of nine runs of four populations (experiments/blend_choice.py),
    # blends chosen per user on validation were significantly better for 5 and worse for 1,
    # at 29% more of the choice's time: an option, off by default
    serve_blends: str = setting(
        "",
        "Weights μ in (0, 1) of the blends ΔW_global + μ·(ΔW_personal − ΔW_global) the choice "
        "may serve, comma-separated (e.g. 0.25,0.5,0.75); it walks them from the personal "
        "adapter (μ = 1) while the validation loss falls; '': no blends.",
    )

    def __post_init__(self) -> None:
        if self.final_eval_tokens < 0:
            raise ValueError(f"final-eval-tokens must be ≥ 0 (0: all): {self.final_eval_tokens}")
        self.scales()
        self.blends()

    def scales(self) -> tuple[float, ...]:
        """`serve_scales` as the strengths the served choice tries, 1 among them, ascending."""
        try:
            values = {float(x) for x in self.serve_scales.split(",") if x.strip()}
        except ValueError:
            values = {math.nan}
        if not all(0 < v <= 4 for v in values):  # NaN fails too
            raise ValueError(
                "serve-scales must be numbers in (0, 4], comma-separated; got "
                f"{self.serve_scales!r}"
            )
        return tuple(sorted(values | {1.0}))

    def blends(self) -> tuple[float, ...]:
        """`serve_blends` as the blend weights the served choice tries, ascending."""
        try:
            values = {float(x) for x in self.serve_blends.split(",") if x.strip()}
        except ValueError:
            values = {math.nan}
        if not all(0 < v < 1 for v in values):
            raise ValueError(
                "serve-blends must be numbers in (0, 1), comma-separated, or empty; got "
                f"{self.serve_blends!r}"
            )
        return tuple(sorted(values))


@dataclass(frozen=True)
class FederationConfig:
    """Every setting of a federation: a few here, the rest in one section per concern."""

    run_dir: str = setting("runs/federation", "Run folder.", flag="out")
    base_model: str = setting("", "HF id or folder ('': the embedded SmolLM2-135M-Instruct).")
    # emulator: clients hold the emulator only (FedBiOT); full: clients hold the full model
    client_mode: str = setting(
        "emulator",
        "emulator: clients never hold the full model (FedBiOT); full: they do; split: they hold"
        " its top layers, fed the full model's hidden states below them for their text.",
    )
    seed: int = setting(0, "Seed for sampling, data splits and training.")
    data: DataSettings = field(default_factory=DataSettings)
    schedule: RoundSchedule = field(default_factory=RoundSchedule)
    scheme: SchemeSettings = field(default_factory=SchemeSettings)
    robust: RobustMean = field(default_factory=RobustMean)
    privacy: CentralDP = field(default_factory=CentralDP)
    training: ClientTraining = field(default_factory=ClientTraining)
    emulator: EmulatorSettings = field(default_factory=EmulatorSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    log_to: str = setting(
        "tensorboard",
        "Log rounds, compressions and the evaluation to tensorboard (RUN/tensorboard), mlflow "
        "(RUN/mlflow/mlflow.db), both comma-separated, or none; RUN/rounds.png beside.",
    )
    # devices
    client_gpus: float = setting(0.0, "GPUs per simulated client; > 0: clients train on CUDA.")
    device: str = setting("cpu", "Server device: alignment, corrections, evaluation, compression.")
    threads: int = setting(0, "torch threads on the server; 0: all.")
    # bf16 autocast for the clients' steps, the alignment and the corrections where the device
    # computes bf16 natively (soppu.precision); the final evaluation is fp32 whatever this says
    precision: str = setting(
        "auto",
        "auto: bf16 autocast for training where the device computes bf16 natively; bf16; fp32 (the"
        " final evaluation is always fp32).",
    )

    def __post_init__(self) -> None:
        _check_one_of(self, {"client_mode": CLIENT_MODES, "device": DEVICES})
        self.sinks()  # validates log-to now, not after the first round
        if self.client_gpus < 0:
            raise ValueError(f"client-gpus must be ≥ 0, got {self.client_gpus}")
        if self.threads < 0:
            raise ValueError(f"threads must be ≥ 0 (0: all cores), got {self.threads}")
        if self.scheme.personal_pass and (
            self.scheme.name == "local" or not self.data.validation_fraction
        ):
            raise ValueError(
                "personal-pass starts from the global adapter and stops on each user's "
                "validation text: it needs a scheme with a global adapter and "
                "validation-fraction > 0"
            )
        if self.emulator.repair_steps and not self.data.validation_fraction:
            raise ValueError(
                "repair-steps: a client keeps its repair only where it closes the emulator's "
                "gap to the full model on the user's validation text, so it needs "
                "validation-fraction > 0"
            )
        e = self.emulator
        if self.client_mode == "split" and (e.bottom or e.repair_steps):
            raise ValueError(
                "client-mode split: the client holds the top layers only and trains them "
                "exactly, so it takes no bottom layers and no repair (bottom, repair-steps)"
            )
        if e.top < 0:
            raise ValueError(f"top must be ≥ 0 (0: the client mode's), got {e.top}")
        if e.repair_steps and e.repair_for == "pass" and not self.scheme.personal_pass:
            raise ValueError(
                "repair-for pass repairs the emulator for the final personal pass only: it "
                "needs personal-pass > 0"
            )
        self.train()  # validates the training settings now, not in every client

    @classmethod
    def from_run_config(cls, values: dict[str, Any], **overrides: Any) -> FederationConfig:
        """From a flat run config (Flower's, run.json's, a `--config` file's: keys with `-` or
        `_`, an older run folder's among them) and flat `overrides`; unknown keys are refused
        by name, values are coerced to each field's type."""
        given: dict[str | None, dict[str, Any]] = {}
        for raw, value in {**values, **overrides}.items():
            name, value = _upgrade(raw.replace("-", "_"), value)
            if name not in FLAT:
                raise ValueError(f"run config: unknown key {raw!r}")
            owner, of = FLAT[name]
            given.setdefault(owner, {})[of.name] = _coerce(type(of.default), value, raw)
        sections = {owner: SECTIONS[owner](**chosen) for owner, chosen in given.items() if owner}
        return cls(**given.get(None, {}), **sections)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat key (`_` form): run.json's `config`."""
        return {
            name: getattr(getattr(self, owner) if owner else self, of.name)
            for name, (owner, of) in FLAT.items()
        }

    def to_run_config(self) -> dict[str, Any]:
        """Flower's run config: every setting by its key, `-` for `_`."""
        return {name.replace("_", "-"): value for name, value in self.flat().items()}

    def to_toml(self) -> str:
        """The run config as TOML lines, each with its help: what `[tool.flwr.app.config]`
        holds and `soppu simulate --config` reads."""
        return "".join(
            f"{key.replace('_', '-')} = {_toml_value(value)}  # {HELP[key]}\n"
            for key, value in self.flat().items()
        )

    def train(self, round_: int = 1) -> TrainConfig:
        """Round `round_`'s client training: its data order continues where the earlier rounds'
        stopped, so a user trains on all their text rather than the first round's batches again."""
        mode = MODE_RECIPES[self.client_mode]
        t = self.training
        return TrainConfig(
            steps=t.local_steps,
            lr=t.lr or mode.lr,
            lr_scheduler_type=t.lr_scheduler_type or mode.schedule,
            # a round of fewer steps than the warm-up still ends at the full lr
            warmup_steps=min(t.warmup_steps, max(t.local_steps - 1, 0)),
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            rank=t.lora_rank,
            alpha=t.lora_alpha,
            target_modules=t.targets or mode.targets,
            lora_layers=t.lora_layers,
            seed=self.seed,
            first_step=(round_ - 1) * t.local_steps,
            max_eval_tokens=t.max_eval_tokens,
            precision=self.precision,
        )

    def personal_pass_train(self) -> TrainConfig:
        """The final pass's training: its own steps at a constant, gentler lr, its data order
        continuing after the rounds'."""
        return replace(
            self.train(self.schedule.rounds + 1),
            steps=self.scheme.personal_pass,
            lr=self.scheme.personal_pass_lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
        )

    def judge(self) -> TrainConfig:
        """The final evaluation's and the served choice's settings: the clients' batch and
        length, over `final_eval_tokens` of each user's text."""
        return replace(self.train(), max_eval_tokens=self.evaluation.final_eval_tokens or 2**62)

    def sinks(self) -> tuple[str, ...]:
        """`log_to` as the sinks it names; () for none."""
        names = tuple(dict.fromkeys(n.strip() for n in self.log_to.split(",") if n.strip()))
        if names == ("none",):
            return ()
        if not names or any(name not in LOG_SINKS for name in names):
            raise ValueError(
                f"log-to must be none or one or more of {', '.join(LOG_SINKS)}, "
                f"comma-separated; got {self.log_to!r}"
            )
        if "mlflow" in names and importlib.util.find_spec("mlflow") is None:
            raise ValueError("log-to mlflow needs MLflow: pip install 'soppu[mlflow]'")
        return names

    def data_options(self) -> DataOptions:
        return self.data.options(self.seed)

    def plan(self, num_layers: int) -> EmulatorPlan:
        """In full mode the client's model is the full model: an emulator that drops nothing;
        in split mode its top layers only."""
        from soppu.emulator import EmulatorPlan

        e = self.emulator
        drop = 0.0 if self.client_mode == "full" else e.drop
        return EmulatorPlan(
            num_layers,
            top=e.top,
            bottom=e.bottom,
            drop=drop,
            select=e.layer_select,
            split=self.client_mode == "split",
        )

    def public_source(self) -> str:
        """The public text's source, resolved (`soppu.public`: "" is the users' data's default)."""
        from soppu.public import default_public

        return self.emulator.public or default_public(self.data.source)

    def align_steps(self) -> int:
        """The emulator's alignment steps, resolved (`-1`: the public text's default)."""
        from soppu.public import align_steps

        return align_steps(self.public_source(), self.emulator.align_steps)

    def compression_config(self) -> CompressionConfig:
        return self.compression.to_config(self.device)


SECTIONS: dict[str, Any] = {  # a section is a field whose default is made by its dataclass
    f.name: f.default_factory for f in fields(FederationConfig) if f.default_factory is not MISSING
}


def _flat_fields() -> dict[str, tuple[str | None, Field]]:
    """Flat key → (the section holding it, or None at the top; its field), in order."""
    flat: dict[str, tuple[str | None, Field]] = {}
    for top in fields(FederationConfig):
        kind = SECTIONS.get(top.name)
        for owner, of in [(top.name, f) for f in fields(kind)] if kind else [(None, top)]:
            if field_key(of) in flat:
                raise TypeError(f"two settings have the run-config key {field_key(of)!r}")
            flat[field_key(of)] = (owner, of)
    return flat


FLAT = _flat_fields()
FIELDS: dict[str, Field] = {name: of for name, (_, of) in FLAT.items()}  # key → its field
HELP = {name: of.metadata["help"] for name, of in FIELDS.items()}  # --print-config, the flags
FLAGS = {name: of.metadata["flag"] for name, of in FIELDS.items() if "flag" in of.metadata}


def flag(name: str) -> str:
    """The `soppu simulate` flag of a setting, by its flat key."""
    return field_flag(FIELDS[name])


def _upgrade(name: str, value: Any) -> tuple[str, Any]:
    """A run-config key of an older run folder as today's (name, value)."""
    if name == "aggregation" and value in LEGACY_AGGREGATION:  # before `scheme`
        return "scheme", LEGACY_AGGREGATION[value]
    if name == "tracking":  # before `log_to`: TensorBoard or nothing
        return "log_to", "tensorboard" if _coerce(bool, value, name) else "none"
    return name, value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string or number is a TOML one


def _coerce(kind: type, value: Any, key: str) -> Any:
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"run config: {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config: {key} must be {kind.__name__}, got {value!r}") from None
