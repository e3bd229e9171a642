"""Server-side alignment of the emulator to the full model (FedBiOT), on public text only.

Two parts, both the server's, neither touching a user's text:

- Weights, once per emulator: a few distillation steps tuning only the emulator's kept middle
  layers. Loss = l2_weight · ‖h_emu − h_full‖² / ‖h_full‖² at the input of the top adapter
  layers + KL(p_full ‖ p_emu) per token, so the adapter layers see inputs like the full
  model's and the outputs agree.
- Gradients, every round (`gradient_correction`): even an aligned emulator is a different
  function, and a LoRA trained on it mostly learns to repair the emulator's own errors, which
  the full model does not have (measured: the LoRA's gradient on public text points almost
  orthogonally on the two models). The server measures that bias at the round's starting
  adapter, g_full − g_emu on public batches, and the client adds it to every gradient step: a
  control variate (as SCAFFOLD corrects client drift), so the client descends the full
  model's loss on its own text. It is FedBiOT's bi-level step (align with the current adapter
  plugged into both models) done on the gradients the client uses, at the cost of two
  forward-backward passes per public batch on the server, and no new emulator to ship.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soppu import lm
from soppu.adapters import LoraState
from soppu.emulator import (
    EmulatorError,
    EmulatorInfo,
    EmulatorPlan,
    build,
    layer_importance,
    to_full_keys,
    version_id,
)
from soppu.personalize import attached, lora_parameters


@dataclass(frozen=True)
class AlignConfig:
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    l2_weight: float = 1.0
    eval_blocks: int = 8  # held-out public blocks for the before/after losses
    importance_blocks: int = 16  # public blocks that rank the middle layers (select=importance)
    seed: int = 0
    precision: str = "auto"  # soppu.precision: bf16 autocast where native; part of the cache key


@dataclass
class AlignTerms:
    l2: float
    kl: float

    def total(self, l2_weight: float) -> float:
        return l2_weight * self.l2 + self.kl


def _boundary_inputs(
    model: nn.Module, batch: lm.Batch, layer: int, precision: str
) -> tuple[Tensor, Tensor]:
    """(hidden state entering decoder layer `layer`, logits)."""
    out = lm.forward(model, batch, precision, output_hidden_states=True)
    return out.hidden_states[layer], out.logits


def _terms(
    full: nn.Module, emulator: nn.Module, info: EmulatorInfo, batch: lm.Batch, precision: str
) -> tuple[Tensor, Tensor]:
    boundary_full = info.plan["num_layers"] - info.plan["top"]  # first top adapter layer
    boundary_emu = info.emulator_index(boundary_full)
    with torch.no_grad():
        h_full, logits_full = _boundary_inputs(full, batch, boundary_full, precision)
    h_emu, logits_emu = _boundary_inputs(emulator, batch, boundary_emu, precision)
    keep = batch.mask.bool().to(h_emu.device)
    # Per token, so the few tokens with huge activations (attention sinks) do not dominate.
    h_full, h_emu = h_full.float(), h_emu.float()  # bf16 under autocast
    full_sq = h_full[keep].pow(2).sum(-1).clamp_min(1e-12)
    l2 = ((h_emu - h_full)[keep].pow(2).sum(-1) / full_sq).mean()
    log_p_full = F.log_softmax(logits_full[keep].float(), dim=-1)
    log_p_emu = F.log_softmax(logits_emu[keep].float(), dim=-1)
    kl = F.kl_div(log_p_emu, log_p_full, log_target=True, reduction="batchmean")
    return l2, kl


@torch.no_grad()
def measure(
    full: nn.Module,
    emulator: nn.Module,
    info: EmulatorInfo,
    blocks: Sequence[Tensor],
    pad_id: int,
    batch_size: int,
    precision: str = "fp32",
) -> AlignTerms:
    l2_sum, kl_sum, count = 0.0, 0.0, 0
    for batch in lm.batches(blocks, batch_size, pad_id):
        l2, kl = _terms(full, emulator, info, batch, precision)
        l2_sum, kl_sum, count = l2_sum + float(l2), kl_sum + float(kl), count + 1
    return AlignTerms(l2_sum / max(count, 1), kl_sum / max(count, 1))


def align(
    full: nn.Module,
    emulator: nn.Module,
    info: EmulatorInfo,
    public_blocks: Sequence[Tensor],
    pad_id: int,
    config: AlignConfig = AlignConfig(),
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> dict:
    """Tune the emulator's middle layers in place; returns the losses before and after.
    `progress(0, steps, loss)` comes before the first step, then once per step."""
    if len(public_blocks) <= config.eval_blocks:
        raise ValueError(
            f"alignment needs more than {config.eval_blocks} blocks of public text, "
            f"got {len(public_blocks)}"
        )
    began = time.perf_counter()
    held_out, train = public_blocks[: config.eval_blocks], public_blocks[config.eval_blocks :]
    params = middle_parameters(emulator, info)
    mixed = config.precision
    before = measure(full, emulator, info, held_out, pad_id, config.batch_size, mixed)
    progress(0, config.steps, before.total(config.l2_weight))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    emulator.train()
    batches = lm.training_batches(train, config.batch_size, config.steps, pad_id, config.seed)
    for step, batch in enumerate(batches, start=1):
        l2, kl = _terms(full, emulator, info, batch, mixed)
        loss = config.l2_weight * l2 + kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress(step, config.steps, loss.item())
    emulator.eval().requires_grad_(False)
    after = measure(full, emulator, info, held_out, pad_id, config.batch_size, mixed)
    return {
        "config": asdict(config),
        "public_blocks": len(public_blocks),
        "seconds": time.perf_counter() - began,
        "before": {**asdict(before), "loss": before.total(config.l2_weight)},
        "after": {**asdict(after), "loss": after.total(config.l2_weight)},
    }


def middle_parameters(emulator: nn.Module, info: EmulatorInfo) -> list[nn.Parameter]:
    """Only the kept middle layers learn; embeddings, head and adapter layers stay the full
    model's, so the adapter still plugs back in."""
    emulator.requires_grad_(False)
    layers = emulator.get_submodule(info.layers_path)
    adapter = set(info.emulator_adapter_layers)
    params = []
    for j, layer in enumerate(layers):
        if j not in adapter:  # a LoRA plugged in (`realign`) stays as it is
            params += [p for name, p in layer.named_parameters() if "lora_" not in name]
    for param in params:
        param.requires_grad_(True)
    if not params:
        raise ValueError("the emulator keeps no middle layers (drop ratio 1): nothing to align")
    return params


def build_aligned(
    full: nn.Module,
    tokenizer,
    base_model: str,
    plan: EmulatorPlan,
    public: Sequence[str],
    config: AlignConfig = AlignConfig(),
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> tuple[nn.Module, EmulatorInfo]:
    """Build the emulator (its middle layers chosen on public text if the plan asks) and, when
    it drops layers and steps > 0, align it. With no public text it stays unaligned:
    `info.aligned` says so, and callers must say it too."""
    blocks = lm.token_blocks(tokenizer, "\n".join(public), config.seq_len) if public else []
    importance = None
    if plan.needs_importance:
        if not blocks:
            raise EmulatorError("choosing layers by importance needs public text")
        sample = blocks[config.eval_blocks :][: config.importance_blocks] or blocks
        importance = layer_importance(
            full, lm.batches(sample, config.batch_size, tokenizer.pad_token_id)
        )
    emulator, info = build(full, plan, base_model, importance)
    if not info.exact and config.steps > 0 and blocks:
        info.alignment = align(
            full, emulator, info, blocks, tokenizer.pad_token_id, config, progress
        )
        info.version = version_id(emulator, info)
    return emulator, info


def realign(
    full: nn.Module,
    emulator: nn.Module,
    info: EmulatorInfo,
    lora: LoraState,
    public_blocks: Sequence[Tensor],
    pad_id: int,
    config: AlignConfig = AlignConfig(),
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> dict:
    """FedBiOT's bi-level step: `align` with `lora` (full-model keys) plugged into both models,
    so the emulator's middle layers learn to pass on what the full model does *with* the
    adapter; the LoRA itself does not move. Tunes the emulator in place."""
    with attached(full, lora), attached(emulator, info.lora_on_emulator(lora)):
        # PEFT injects into the modules in place: the bare models now run with the LoRA
        return align(full, emulator, info, public_blocks, pad_id, config, progress)


def gradient_correction(
    full: nn.Module,
    emulator: nn.Module,
    info: EmulatorInfo,
    lora: LoraState,
    public_blocks: Sequence[Tensor],
    pad_id: int,
    *,
    batches: int = 8,
    batch_size: int = 4,
    seed: int = 0,
    precision: str = "auto",
) -> dict[str, Tensor]:
    """The emulator's gradient bias at `lora` (full-model keys): g_full − g_emu of the LoRA's
    mean loss over `batches` public batches, both measured in the clients' `precision`.
    Empty for an exact emulator (full mode)."""
    if info.exact or batches <= 0:
        return {}
    chosen = list(lm.training_batches(public_blocks, batch_size, batches, pad_id, seed))
    on_full = _lora_gradient(full, lora, chosen, precision)
    on_emulator = _lora_gradient(emulator, info.lora_on_emulator(lora), chosen, precision)
    on_emulator = to_full_keys(on_emulator, info)
    return {key: on_full[key] - on_emulator[key] for key in on_full}


def _lora_gradient(
    model: nn.Module, lora: LoraState, batches: list[lm.Batch], precision: str
) -> dict:
    with attached(model, lora, trainable=True) as peft_model:
        params = lora_parameters(peft_model)
        peft_model.train()
        for batch in batches:
            (lm.lm_loss(peft_model, batch, precision) / len(batches)).backward()
        peft_model.eval()
        return {key: param.grad.detach().clone() for key, param in params.items()}
