"""Local personalisation: train one user's LoRA on the emulator, then evaluate it.

This is what a Flower client calls. The LoRA sits on every layer the emulator keeps (or on the
adapter layers only); while it trains its keys use the emulator's layer numbers, and it leaves
here with the full model's (`adapters.LoraState`), so the same tensors load on the full model
with PEFT unchanged. The server may send a gradient correction
(`alignment.gradient_correction`): the emulator's gradient bias measured on public text, added
to every step's gradient so that the client descends the full model's loss rather than
repairing the emulator's own errors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import Tensor, nn
from transformers import get_scheduler

from soppu import lm
from soppu.adapters import AdapterError, LoraState
from soppu.basemodel import default_target_modules
from soppu.data import UserText
from soppu.emulator import EmulatorInfo, to_emulator_keys
from soppu.train_config import TrainConfig


@dataclass
class PersonalizeResult:
    user_id: str
    lora: LoraState
    train_loss: list[float]
    train_tokens: int
    test_tokens: int
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stopping: EarlyStopping | None = None  # where early stopping kept the adapter

    def summary(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        del out["lora"]
        if self.stopping is not None:
            stop = self.stopping
            out["stopping"] = {"best_step": stop.best_step, "checked": stop.checked}
        return out


@dataclass
class EarlyStopping:
    """Keep the step whose adapter has the lowest loss on `blocks` (a validation split),
    checked before the first step and every `every` steps; the starting adapter counts, so
    training never ends worse than it began on that text."""

    blocks: list[Tensor]
    every: int
    best_step: int = 0
    checked: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)

    def __post_init__(self) -> None:
        if self.every < 1 or not self.blocks:
            raise ValueError("early stopping needs validation text and a check every ≥ 1 steps")


ALL_LINEAR = "all-linear"  # PEFT's name for every linear projection of the decoder layers


def new_lora_config(info: EmulatorInfo, model: nn.Module, config: TrainConfig) -> dict:
    """A full-model LoRA config: on every layer the emulator keeps, or on the adapter layers.
    `all-linear` is written out as the projections' names, which vLLM and LoRAX read."""
    targets = list(config.target_modules or default_target_modules(model.config.model_type))
    if targets == [ALL_LINEAR]:
        targets = linear_projections(model, info)
    layers = info.full_layers if config.lora_layers == "all" else info.adapter_layers
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=list(layers),
        layers_pattern=info.layers_path.rsplit(".", 1)[-1],
        base_model_name_or_path=info.base_model,
        task_type="CAUSAL_LM",
    )
    return _jsonable_config(lora)


def linear_projections(model: nn.Module, info: EmulatorInfo) -> list[str]:
    """The names of the linear projections (nn.Linear, GPT-2's Conv1D) in the decoder layers."""
    layers = model.get_submodule(info.layers_path)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }
    if not names:
        raise AdapterError(f"{info.layers_path}: no linear projection to put a LoRA on")
    return sorted(names)


def _jsonable_config(config: LoraConfig) -> dict:
    values = config.to_dict()
    for key, value in values.items():
        if isinstance(value, set):
            values[key] = sorted(value)
        elif hasattr(value, "value"):  # enums such as TaskType
            values[key] = value.value
    return values


@contextmanager
def attached(model: nn.Module, lora: LoraState, *, trainable: bool = False) -> Iterator[nn.Module]:
    """`model` with the LoRA applied through PEFT; the model is left bare again afterwards,
    in the train/eval mode it had (PEFT leaves it training: dropout on, for GPT-2-style models).
    The LoRA's keys and layers must use the model's numbering (`on_emulator` for the emulator).
    """
    was_training = model.training
    peft_model = get_peft_model(model, lora.peft_config())
    try:
        result = set_peft_model_state_dict(peft_model, lora.tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise AdapterError(
                f"LoRA does not fit the model: missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}"
            )
        if trainable:
            for param in lora_parameters(peft_model).values():
                param.requires_grad_(True)
        else:
            peft_model.requires_grad_(False)
        yield peft_model
    finally:
        peft_model.unload()
        model.train(was_training)


def scored(
    model: nn.Module,
    lora: LoraState | None,
    blocks: list[Tensor],
    pad_id: int,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """`lm.block_nll` of `model` with `lora` attached (None: the bare model), in `precision`
    (`soppu.precision`; the run's judge is fp32)."""
    if lora is None:
        return lm.block_nll(model, blocks, pad_id, batch_size, precision)
    with attached(model, lora) as peft_model:
        return lm.block_nll(peft_model, blocks, pad_id, batch_size, precision)


def lora_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters by their PEFT state-dict key (the adapter name left out)."""
    return {
        name.replace(".default.", "."): param
        for name, param in peft_model.named_parameters()
        if "lora_" in name
    }


def train_lora(
    emulator: nn.Module,
    info: EmulatorInfo,
    train_blocks: list[Tensor],
    pad_id: int,
    config: TrainConfig,
    start: LoraState,
    progress: Callable[[int, int, float], None] = lambda *_: None,
    correction: dict[str, Tensor] | None = None,
    anchor: LoraState | None = None,
    prox: float = 0.0,
    stopping: EarlyStopping | None = None,
) -> tuple[LoraState, list[float]]:
    """Train from `start` on the emulator; returns the new LoRA (full-model keys) and losses.

    `correction` (full-model keys, as `start`'s tensors) is added to every step's gradient;
    with `anchor` (a LoRA of the same shapes) so is prox · (lora − anchor), the gradient of
    Ditto's proximal term prox/2 · ‖lora − anchor‖² on the LoRA tensors. With `stopping`, the
    LoRA returned is the one of the checked step with the lowest validation loss.
    """
    on_emulator = info.lora_on_emulator(start)
    shift = to_emulator_keys(correction, info) if correction else {}
    pull = to_emulator_keys(anchor.tensors, info) if anchor is not None and prox > 0 else {}
    torch.manual_seed(config.seed)
    losses = []
    with attached(emulator, on_emulator, trainable=True) as model:
        params = lora_parameters(model)
        _check_correction(shift, params)
        _check_correction(pull, params, "proximal anchor")
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        best = _check(model, params, stopping, 0, pad_id, config, None)
        model.train()
        batches = lm.training_batches(
            train_blocks, config.batch_size, config.steps, pad_id, config.seed, config.first_step
        )
        for step, batch in enumerate(batches, start=1):
            loss = lm.lm_loss(model, batch, config.precision)
            loss.backward()
            for key, delta in shift.items():
                params[key].grad += delta.to(params[key].grad)
            for key, target in pull.items():
                params[key].grad += prox * (params[key].detach() - target.to(params[key]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress(step, config.steps, losses[-1])
            if stopping and (step % stopping.every == 0 or step == config.steps):
                best = _check(model, params, stopping, step, pad_id, config, best)
        model.eval()
        trained = best or {k: v.detach().float().clone() for k, v in params.items()}
    return info.lora_on_full_model(LoraState(trained, on_emulator.config)), losses


def _check(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    stopping: EarlyStopping | None,
    step: int,
    pad_id: int,
    config: TrainConfig,
    best: dict[str, Tensor] | None,
) -> dict[str, Tensor] | None:
    """Score the adapter on the validation blocks; a copy of it if it is the best so far."""
    if stopping is None:
        return None
    model.eval()
    with torch.no_grad():
        loss = math.log(
            lm.perplexity(model, stopping.blocks, pad_id, config.batch_size, config.precision)
        )
    model.train()
    stopping.checked.append((step, loss))
    if best is not None and loss >= min(v for s, v in stopping.checked if s != step):
        return best
    stopping.best_step = step
    return {k: v.detach().float().clone() for k, v in params.items()}


def _check_correction(
    shift: dict[str, Tensor], params: dict[str, nn.Parameter], what: str = "gradient correction"
) -> None:
    if not shift:
        return
    if set(shift) != set(params):
        raise AdapterError(f"{what} does not fit the LoRA: its keys differ")
    for key, delta in shift.items():
        if delta.shape != params[key].shape or not torch.isfinite(delta).all():
            raise AdapterError(f"{what} for {key}: wrong shape or not finite")


def fresh_lora(emulator: nn.Module, info: EmulatorInfo, config: TrainConfig) -> LoraState:
    """PEFT's own initialisation (A random, B zero): the adapter starts as the identity."""
    full_config = new_lora_config(info, emulator, config)
    on_emulator = info.lora_on_emulator(LoraState({}, full_config))
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(emulator, on_emulator.peft_config())
    try:
        tensors = {k: v.detach().clone() for k, v in lora_parameters(peft_model).items()}
    finally:
        peft_model.unload()
    return info.lora_on_full_model(LoraState(tensors, on_emulator.config))


def personalize(
    user: UserText,
    emulator: nn.Module,
    info: EmulatorInfo,
    tokenizer,
    config: TrainConfig = TrainConfig(),
    *,
    start: LoraState | None = None,
    full_model: nn.Module | None = None,
    progress: Callable[[int, int, float], None] = lambda *_: None,
    correction: dict[str, Tensor] | None = None,
    anchor: LoraState | None = None,
    prox: float = 0.0,
    stop_every: int = 0,
) -> PersonalizeResult:
    """Train the user's LoRA on the emulator and measure held-out perplexity; with `anchor`,
    each step is also pulled towards it by the proximal term prox/2 · ‖lora − anchor‖² (Ditto);
    with `stop_every`, the adapter kept is the one best on the user's validation text, checked
    every `stop_every` steps (a final personalisation pass).

    Perplexities: `emulator_start` (emulator with the starting adapter, none if fresh) and
    `emulator_adapter`; with `full_model` also `base` (full model alone) and `full_adapter`
    (the trained LoRA plugged into the full model).
    """
    # Over 60 lines only by its keyword options and this docstring; the body is one pass.
    began = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    train_blocks = lm.token_blocks(tokenizer, user.train, config.seq_len)
    test_blocks = lm.token_blocks(tokenizer, user.test, config.seq_len, config.max_eval_tokens)
    if not train_blocks or not test_blocks:
        raise ValueError(f"user {user.user_id!r} has too little text to train and evaluate")
    start = start or fresh_lora(emulator, info, config)

    def emulator_ppl(lora: LoraState) -> float:  # the client's own check, in its precision
        with attached(emulator, info.lora_on_emulator(lora)) as model:
            return lm.perplexity(model, test_blocks, pad_id, config.batch_size, config.precision)

    ppl = {"emulator_start": emulator_ppl(start)}
    stopping = None
    if stop_every:
        validation = lm.token_blocks(tokenizer, user.validation, config.seq_len)
        if not validation:
            raise ValueError(f"user {user.user_id!r} has no validation text to stop early on")
        stopping = EarlyStopping(validation, stop_every)
    lora, losses = train_lora(
        emulator,
        info,
        train_blocks,
        pad_id,
        config,
        start,
        progress,
        correction,
        anchor,
        prox,
        stopping,
    )
    ppl["emulator_adapter"] = emulator_ppl(lora)
    if full_model is not None:
        ppl["base"] = lm.perplexity(full_model, test_blocks, pad_id, config.batch_size)
        with attached(full_model, lora) as model:
            ppl["full_adapter"] = lm.perplexity(model, test_blocks, pad_id, config.batch_size)
    return PersonalizeResult(
        user_id=user.user_id,
        lora=lora,
        train_loss=losses,
        train_tokens=sum(b.numel() for b in train_blocks),
        test_tokens=sum(b.numel() for b in test_blocks),
        perplexity=ppl,
        seconds=time.perf_counter() - began,
        stopping=stopping,
    )


def time_training_step(
    model: nn.Module,
    lora: LoraState,
    batch: lm.Batch,
    repeats: int = 3,
    precision: str = "auto",
) -> float:
    """Median seconds of one LoRA training step (forward, backward, AdamW) on `model`."""
    times = []
    with attached(model, lora, trainable=True) as peft_model:
        optimizer = torch.optim.AdamW(lora_parameters(peft_model).values(), lr=1e-6)
        peft_model.train()
        for _ in range(repeats + 1):  # the first step warms up allocators and kernels
            began = time.perf_counter()
            lm.lm_loss(peft_model, batch, precision).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)
        peft_model.eval()
    return sorted(times[1:])[len(times[1:]) // 2]
