"""The federation's one typed config, the one source of every setting's name, default and help:
each field carries its help (and its flag, where that is not its name) in its metadata
(`soppu.settings.setting`, as PEFT's configs do); `soppu simulate`'s flags are derived from
it, and `[tool.flwr.app.config]` is its `to_toml()` (`soppu simulate --print-config` writes
it; a test proves pyproject's is).

Flower run-config keys are the field names with `-` for `_` (`local-steps`, `fraction-train`);
`soppu simulate` flags are the same names, but for the few in `FLAGS`. Empty strings and zeros
mean "the default" where a run config cannot hold None.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from soppu.compression.methods import HELP as METHOD_HELP
from soppu.settings import flag as field_flag
from soppu.settings import flags, helps, setting
from soppu.train_config import LORA_LAYERS, TrainConfig

if TYPE_CHECKING:  # imported where used: `soppu --help` reads this module without torch
    from soppu.compression.compress import CompressionConfig
    from soppu.data import DataOptions
    from soppu.emulator import EmulatorPlan

SCHEMES = ("fedavg-ft", "local", "fedsa", "ditto")  # server/schemes/ (not imported: no torch)
LEGACY_AGGREGATION = {"fedavg": "fedavg-ft", "none": "local"}  # run folders before `scheme`
LOG_SINKS = ("tensorboard", "mlflow")  # soppu/server/tracking.py
CLIENT_MODES = ("emulator", "full")
# Each client mode's learning rate and schedule within a round, measured on 16 users (README,
# "Each user's gain"): on the emulator a 3-step warm-up lets 1.5e-3 lift the shared gain; on
# the full model, every layer trainable, 1.5e-3 left the personal adapter behind the global
# one for 6 of 16 users and a constant 1e-3 for 3 (28.8% gain against 29.9%)
MODE_SCHEDULES = {"emulator": (1.5e-3, "constant_with_warmup"), "full": (1e-3, "constant")}
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class FederationConfig:
    run_dir: str = setting("runs/federation", "Run folder.", flag="out")
    base_model: str = setting("", "HF id or folder ('': the embedded SmolLM2-135M-Instruct).")
    data: str = setting(
        "",
        "Users' text: a JSONL/CSV/Parquet file, hf:DATASET[@SUBSET] or py:MODULE:FUNCTION ('': the"
        " embedded Shakespeare roles).",
    )
    users: int = setting(8, "Users (nodes): those with the most text; 0: all.")
    rounds: int = setting(2, "Federated rounds.")
    fraction_train: float = setting(1.0, "Share of the users trained each round.")
    min_train_nodes: int = setting(1, "At least this many users trained each round.")
    fraction_evaluate: float = setting(
        0.0,
        "Share of the users evaluated on the emulator each round.",
    )
    round_timeout: float = setting(3600.0, "Seconds a round waits for replies.")
    node_wait: float = setting(120.0, "Seconds to wait for the nodes to connect.")
    # what users start from, what is averaged, what stays personal (server/schemes/)
    scheme: str = setting(
        "fedavg-ft",
        "fedavg-ft (from the global adapter each round), local (own only), fedsa (A shared, B "
        "personal) or ditto (personal pulled to the global by prox).",
    )
    prox: float = setting(
        0.1,
        "ditto: the pull prox/2·‖P − G‖² of each personal adapter to the global one.",
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
    # the robust mean of replies (soppu/server/schemes/aggregate.py): updates clipped to clip × the
    # round's median norm, num-examples capped at weight_cap × the round's median; 0: off;
    # trim: the share of replies left out at each end of every coordinate (0.5: the median)
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
    # central differential privacy on the global adapter (soppu/server/schemes/privacy.py):
    # updates clipped to dp_clip, averaged unweighted, Gaussian noise dp_noise × dp_clip / n;
    # replaces the robust mean; ε at dp_delta is logged and recorded each round
    dp_noise: float = setting(
        0.0,
        "Central DP on the global adapter: noise multiplier (0: off; replaces the robust mean).",
    )
    dp_clip: float = setting(0.0, "Central DP: every user's update clipped to this L2 norm.")
    dp_delta: float = setting(1e-5, "Central DP: the δ at which ε is reported.")
    # emulator: clients hold the emulator only (FedBiOT); full: clients hold the full model
    client_mode: str = setting(
        "emulator",
        "emulator: clients never hold the full model (FedBiOT); full: they do.",
    )
    compress_every: int = setting(0, "Compress every K rounds; 0: after the last only.")
    compress_rank: int = setting(
        0,
        "Compression: shared rank per slot; 0: choose by --energy.",
        flag="rank",
    )
    # 0.98 and 8 bits, measured (experiments/compression_defaults.py): on 16 users' adapters
    # they keep 96% (100% in full mode) of the personal gain over the global adapter at 23×
    # (13×), and 97% (99%) on fp32-trained ones, where 0.97 kept 85% at 30×, its p25 80%
    compress_energy: float = setting(
        0.98,
        "Compression: share of the energy kept (when no --rank).",
        flag="energy",
    )
    compress_sigma: str = setting(
        "full",
        f"Compression: the per-user core, {METHOD_HELP}",
        flag="sigma",
    )
    compress_bits: int = setting(
        8,
        "Compression: 32, or 8/4 (bases and cores stored as integer codes).",
        flag="bits",
    )
    compress_clusters: int = setting(
        1,
        "Compression: bases per slot; 0: choose 1–4 per slot.",
        flag="clusters",
    )
    # norm: every user counts alike, so no one user's norm (a hostile reply scaled ×1e4) can
    # take the shared bases; measured on three populations it costs 1–2% of the storage ratio
    # and nothing of what users keep (docs/benchmarks.md, "Compression weights")
    compress_weights: str = setting(
        "norm",
        "Compression: uniform, or norm (every user counts alike).",
        flag="weights",
    )
    compress_group: str = setting(
        "slot",
        "Compression: slot (a basis per layer and module) or shape.",
        flag="group",
    )
    # users who join after a compression round are projected onto its bases; a slot whose
    # new users carry more than this share of their energy outside its bases is refit
    compress_refit_above: float = setting(
        0.2,
        "Refit a slot when users joining carry more energy outside it.",
    )
    export_rank: int = setting(0, "Serving rank of the published adapters; 0: exact.")
    final_evaluation: bool = setting(True, "Per-user perplexities on the full model after the run.")
    log_to: str = setting(
        "tensorboard",
        "Log rounds, compressions and the evaluation to tensorboard (RUN/tensorboard), mlflow "
        "(RUN/mlflow/mlflow.db), both comma-separated, or none; RUN/rounds.png beside.",
    )
    # local training
    # per round; the main job (8 users, 2 rounds) then fits 15 minutes
    local_steps: int = setting(15, "Client training steps per round.")
    # every round's AdamW starts afresh from the global adapter; a 3-step warm-up lets it take a
    # higher lr (experiments/lr_schedules.py, 8 users: median gain 16.6% against 14.1% at a
    # constant 1e-3, and 13.6% with the warm-up at 1e-3); 0 and "": the mode's MODE_SCHEDULES
    lr: float = setting(
        0.0,
        "Client learning rate; 0: the client mode's (emulator 1.5e-3, full 1e-3).",
    )
    lr_scheduler_type: str = setting(
        "",
        "Client lr schedule, each round: constant, constant_with_warmup, linear, cosine; '': the "
        "client mode's (emulator constant_with_warmup, full constant).",
    )
    warmup_steps: int = setting(
        3,
        "Client lr warm-up steps from 0, each round, at most local-steps − 1 (constant ignores "
        "it).",
    )
    batch_size: int = setting(4, "Sequences per step.")
    seq_len: int = setting(128, "Tokens per sequence.")
    lora_rank: int = setting(8, "LoRA rank.")
    lora_alpha: float = setting(16.0, "LoRA α.")
    target_modules: str = setting("", "LoRA targets, comma-separated ('': q_proj,v_proj).")
    lora_layers: str = setting(
        "all",
        "all: every layer the client's model has; adapter: top/bottom only.",
    )
    correction_batches: int = setting(
        8,
        "Public batches for each round's gradient correction; 0: off.",
    )
    max_eval_tokens: int = setting(
        2048,
        "Held-out tokens each client checks its adapter on (emulator).",
    )
    # the server's judgement on the full model: held-out tokens per user in the final
    # evaluation, validation tokens in the served choice; enough for intervals that tell a
    # win from noise (0: all of them)
    final_eval_tokens: int = setting(
        8192,
        "Held-out (validation) tokens per user in the final evaluation (the served choice) on the "
        "full model; 0: all.",
    )
    seed: int = setting(0, "Seed for sampling, data splits and training.")
    # the emulator
    emulator: str = setting("", "An emulator folder ('': build one and cache it).")
    top: int = setting(2, "Adapter layers: the last N.")
    bottom: int = setting(0, "Adapter layers: also the first N.")
    drop: float = setting(0.5, "Share of the middle layers the emulator drops.")
    layer_select: str = setting(
        "importance",
        "Middle layers the emulator keeps: importance or even.",
    )
    align_steps: int = setting(60, "Emulator alignment steps.")
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
    # devices
    client_gpus: float = setting(0.0, "GPUs per simulated client; > 0: clients train on CUDA.")
    device: str = setting("cpu", "Server device: alignment, corrections, evaluation, compression.")
    # the users' data
    user_column: str = setting("user_id", "Column with the user id.")
    text_column: str = setting("text", "Column with the text.")
    min_chars: int = setting(1000, "Skip users with less text than this.")
    test_fraction: float = setting(0.2, "Held-out share of each user's text (the last part).")
    # the share before the held-out part on which each user's served adapter is chosen
    # (personal, global or none); 0: no choice, every user is served their personal adapter
    validation_fraction: float = setting(
        0.1,
        "Share before the held-out part on which each user's served adapter is chosen (personal, "
        "global or none); 0: serve the personal one unchosen.",
    )
    # an emulator-trained adapter moves the full model by another amount than it moved the
    # emulator: measured on three populations (experiments/adapter_scale.py), λ chosen per
    # user on validation was significantly better for 9 of 18 users and worse for none
    serve_scales: str = setting(
        "0.5,0.75,1,1.25",
        "Strengths λ (λ·ΔW) at which each adapter may be served, comma-separated; the choice "
        "walks them from 1 while the validation loss falls; '1': as trained only.",
    )
    threads: int = setting(0, "torch threads on the server; 0: all.")
    # bf16 autocast for the clients' steps, the alignment and the corrections where the device
    # computes bf16 natively (soppu.precision); the final evaluation is fp32 whatever this says
    precision: str = setting(
        "auto",
        "auto: bf16 autocast for training where the device computes bf16 natively; bf16; fp32 (the"
        " final evaluation is always fp32).",
    )

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        for name, allowed in (
            ("scheme", SCHEMES),
            ("client_mode", CLIENT_MODES),
            ("lora_layers", LORA_LAYERS),
            ("layer_select", ("importance", "even")),  # soppu.emulator.SELECTIONS
            ("device", DEVICES),
        ):
            if getattr(self, name) not in allowed:
                key = name.replace("_", "-")
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, name)!r}")
        self.sinks()  # validates log-to now, not after the first round
        self.scales()
        if not (self.prox >= 0 and self.prox < float("inf")):
            raise ValueError(f"prox must be finite and ≥ 0, got {self.prox}")
        if self.correction_batches < 0 or self.client_gpus < 0:
            raise ValueError("correction-batches and client-gpus must be ≥ 0")
        if self.compress_every < 0 or self.users < 0 or self.min_train_nodes < 1:
            raise ValueError("compress-every and users must be ≥ 0, min-train-nodes ≥ 1")
        if self.final_eval_tokens < 0:
            raise ValueError(f"final-eval-tokens must be ≥ 0 (0: all): {self.final_eval_tokens}")
        if self.threads < 0:
            raise ValueError(f"threads must be ≥ 0 (0: all cores), got {self.threads}")
        if self.realign_steps < 0:
            raise ValueError(f"realign-steps must be ≥ 0 (0: off), got {self.realign_steps}")
        for name in ("clip", "weight_cap"):  # soppu/server/schemes/aggregate.py's Robustness
            value = getattr(self, name)
            if not (value == 0 or 1 <= value < float("inf")):
                key = name.replace("_", "-")
                raise ValueError(f"{key} must be 0 (off) or a finite factor ≥ 1, got {value}")
        if not 0 <= self.trim <= 0.5:
            raise ValueError(f"trim must be a share in [0, 0.5] (0.5: the median), got {self.trim}")
        if not 0 <= self.dp_noise < float("inf"):
            raise ValueError(
                f"dp-noise must be 0 (off) or a finite multiplier > 0: {self.dp_noise}"
            )
        if self.dp_noise and not (0 < self.dp_clip < float("inf") and 0 < self.dp_delta < 1):
            raise ValueError(
                f"central DP needs a finite dp-clip > 0 and dp-delta in (0, 1), got "
                f"{self.dp_clip}, {self.dp_delta}"
            )
        if self.personal_pass < 0 or self.personal_pass_check < 1:
            raise ValueError("personal-pass must be ≥ 0 and personal-pass-check ≥ 1")
        if self.personal_pass and (self.scheme == "local" or not self.validation_fraction):
            raise ValueError(
                "personal-pass starts from the global adapter and stops on each user's "
                "validation text: it needs a scheme with a global adapter and "
                "validation-fraction > 0"
            )
        self.train()  # validates the training settings now, not in every client
        self.compression()  # validates the compression settings now, not after training

    @classmethod
    def from_run_config(cls, values: dict[str, Any], **overrides: Any) -> FederationConfig:
        """From Flower's run config (hyphenated keys); unknown keys are refused by name."""
        types = {f.name: type(f.default) for f in fields(cls)}
        given = {}
        for key, value in values.items():
            name, value = _upgrade(key.replace("-", "_"), value)
            if name not in types:
                raise ValueError(f"run config: unknown key {key!r}")
            given[name] = _coerce(types[name], value, key)
        return cls(**{**given, **overrides})

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def to_toml(self) -> str:
        """The run config as TOML lines, each with its help: what `[tool.flwr.app.config]`
        holds and `soppu simulate --config` reads."""
        return "".join(
            f"{key} = {_toml_value(value)}  # {HELP[key.replace('-', '_')]}\n"
            for key, value in self.to_run_config().items()
        )

    def train(self, round_: int = 1) -> TrainConfig:
        """Round `round_`'s client training: its data order continues where the earlier rounds'
        stopped, so a user trains on all their text rather than the first round's batches again."""
        mode_lr, mode_schedule = MODE_SCHEDULES[self.client_mode]
        return TrainConfig(
            steps=self.local_steps,
            lr=self.lr or mode_lr,
            lr_scheduler_type=self.lr_scheduler_type or mode_schedule,
            # a round of fewer steps than the warm-up still ends at the full lr
            warmup_steps=min(self.warmup_steps, max(self.local_steps - 1, 0)),
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            target_modules=self.targets,
            lora_layers=self.lora_layers,
            seed=self.seed,
            first_step=(round_ - 1) * self.local_steps,
            max_eval_tokens=self.max_eval_tokens,
            precision=self.precision,
        )

    def personal_pass_train(self) -> TrainConfig:
        """The final pass's training: its own steps at a constant, gentler lr, its data order
        continuing after the rounds'."""
        return replace(
            self.train(self.rounds + 1),
            steps=self.personal_pass,
            lr=self.personal_pass_lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
        )

    def judge(self) -> TrainConfig:
        """The final evaluation's and the served choice's settings: the clients' batch and
        length, over `final_eval_tokens` of each user's text."""
        return replace(self.train(), max_eval_tokens=self.final_eval_tokens or 2**62)

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

    @property
    def targets(self) -> tuple[str, ...] | None:
        names = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        return names or None

    def data_options(self) -> DataOptions:
        from soppu.data import DataOptions

        return DataOptions(
            user_column=self.user_column,
            text_column=self.text_column,
            min_chars=self.min_chars,
            test_fraction=self.test_fraction,
            validation_fraction=self.validation_fraction,
            seed=self.seed,
        )

    def plan(self, num_layers: int) -> EmulatorPlan:
        """In full mode the client's model is the full model: an emulator that drops nothing."""
        drop = 0.0 if self.client_mode == "full" else self.drop
        from soppu.emulator import EmulatorPlan

        return EmulatorPlan(
            num_layers, top=self.top, bottom=self.bottom, drop=drop, select=self.layer_select
        )

    def compression(self) -> CompressionConfig:
        from soppu.compression.compress import CompressionConfig

        return CompressionConfig(
            rank=self.compress_rank or None,
            energy=None if self.compress_rank else self.compress_energy,
            sigma=self.compress_sigma,
            bits=self.compress_bits,
            clusters=self.compress_clusters,
            weights=self.compress_weights,
            group=self.compress_group,
            device=self.device,
        )


HELP = helps(FederationConfig)  # each field's help, for --print-config and the verbs' flags
FLAGS = flags(FederationConfig)  # `soppu simulate` flags that are not the field's name
FIELDS = {f.name: f for f in fields(FederationConfig)}


def flag(name: str) -> str:
    """The `soppu simulate` flag of a field."""
    return field_flag(FIELDS[name])


def _upgrade(name: str, value: Any) -> tuple[str, Any]:
    """A run-config key of an older run folder as today's (name, value)."""
    if name == "aggregation" and value in LEGACY_AGGREGATION:  # before `scheme`
        return "scheme", LEGACY_AGGREGATION[value]
    if name == "tracking":  # before `log_to`: TensorBoard or nothing
        return "log_to", "tensorboard" if _coerce(bool, value, name) else "none"
    return name, value


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """An older run folder's config (field names) as today's."""
    return dict(_upgrade(name, value) for name, value in values.items())


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
