"""Public text without anybody's text: what the full model itself writes (data-free distillation).

The server holds the full model but no user's text, and a user with only their own data has
no public text of their domain to give. The full model's own samples are text of every domain
it knows, in the proportions it knows them: aligning the emulator (and measuring the gradient
correction) on them asks the emulator to copy the full model everywhere, not on one domain.

Each sample starts from one token drawn uniformly from the ordinary vocabulary (as LLM-QAT's
data-free distillation does), so the samples do not all open alike, and continues by plain
sampling at temperature 1 (the full model's own distribution). The texts are cached per model
(by its weights), count, length and seed: a second run reads them back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from soppu import atomic, basemodel
from soppu.precision import autocast


@dataclass(frozen=True)
class GenerationConfig:
    samples: int = 320  # 60 alignment steps × 4 + held-out and importance blocks + corrections
    tokens: int = 128  # new tokens per sample (one alignment block each)
    batch_size: int = 32
    temperature: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # resolved (soppu.precision): bf16 autocast where native is ~2× faster


def generated_text(
    model: nn.Module,
    tokenizer,
    config: GenerationConfig = GenerationConfig(),
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> list[str]:
    """`config.samples` texts the full model writes (from the cache when made before)."""
    key = [basemodel.fingerprint(model), asdict(config)]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = basemodel.cache_dir() / "generated" / f"{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())["texts"]
    texts = sample(model, tokenizer, config, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"config": asdict(config), "texts": texts})
    return texts


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    config: GenerationConfig,
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> list[str]:
    """`config.samples` texts `model` writes now, uncached (a model with an adapter in it has
    no weights' fingerprint of its own)."""
    generator = torch.Generator().manual_seed(config.seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    device = next(model.parameters()).device
    texts: list[str] = []
    total = -(-config.samples // config.batch_size)
    for batch in range(total):
        count = min(config.batch_size, config.samples - len(texts))
        first = ordinary[torch.randint(len(ordinary), (count, 1), generator=generator)]
        torch.manual_seed(config.seed * 1_000_003 + batch)  # generate() samples from torch's RNG
        with autocast(config.precision, device):  # frozen weights: no stale cast to fear
            out = model.generate(
                input_ids=first.to(device),
                attention_mask=torch.ones_like(first).to(device),
                do_sample=True,
                temperature=config.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=config.tokens,
                min_new_tokens=config.tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts += tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
        progress(batch + 1, total, 0.0)
    return texts
