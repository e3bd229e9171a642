"""Text no user owns, which the emulator is aligned and the gradient correction measured on: one
setting (`public`) for the federation, `soppu personalize` and `soppu emulator build`.

    generated   the full model's own samples (data-free: no one's text, every domain it knows)
    pool        the embedded pool: Shakespeare speeches no single role owns
    FILE        JSONL/CSV/Parquet with a `text` column
    ""          the default: the pool for the embedded Shakespeare users, whose own domain it
                is; the full model's samples for anyone's own data (`default_public`; measured
                by experiments/populations_gains.py: on fortune files generated text gives a
                median served gain of 15.9% against the pool's 3.5%, on sympy's docs 8.9%
                against −0.9%, on Shakespeare 5.1%, below the pool's ≈ 17%)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from soppu.generated import generated_text

# `align_steps`' default: the resolved source's own number of steps (`align_steps` below)
SOURCE_STEPS = -1
GENERATED_STEPS = 240  # alignment steps on generated text by default


def align_steps(source: str, steps: int = SOURCE_STEPS) -> int:
    """`steps`, or where it is SOURCE_STEPS the alignment the resolved `source` takes by
    default: 240 steps on generated text, 60 on the pool or a file. Generated text is every
    domain the full model knows, and on users' text of other domains the emulator's KL to the
    full model keeps falling to 240 steps (sympy's docs 1.53 → 1.39, the fortune files 1.37 →
    1.26; experiments/align_curve.py); side by side with 60, all 6 fortune-file users were
    served 2–5 points more and sympy's were about even (experiments/results/
    compare_runs_reuse240-*.md). A given public text is one domain, chosen for its users (the
    pool for the embedded roles), and 60 steps there keep the main job within 10 minutes."""
    if steps != SOURCE_STEPS:
        return steps
    from soppu.alignment import AlignConfig

    return GENERATED_STEPS if source == "generated" else AlignConfig.steps


def default_public(data: str | None) -> str:
    """What `public = ""` means for users' `data` ("" or None: the embedded users)."""
    return "generated" if data else "pool"


def describe(source: str) -> str:
    """What `source` (a resolved one, not "") is, in words, for the log."""
    if source == "generated":
        return "the full model's own samples (data-free; cached once made)"
    if source == "pool":
        return "the embedded pool (Shakespeare text no user owns)"
    return source


def default_generation(seq_len: int = 128, seed: int = 0, precision: str = "auto"):
    """The generation a run with these settings asks for (`soppu prepare` writes the default
    run's ahead, so that the first federation does not wait for it)."""
    from soppu import precision as precisions
    from soppu.generated import GenerationConfig

    resolved = precisions.resolve(precision, "cpu") if precision == "auto" else precision
    return GenerationConfig(tokens=seq_len, seed=seed, precision=resolved)


def public_texts(
    source: str,
    base,
    data: str | None = None,
    *,
    seq_len: int = 128,
    seed: int = 0,
    precision: str = "fp32",
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> list[str]:
    """The texts of `source` ("": the default for users' `data`); `base` (a BaseModel) writes
    them for `generated`, as samples of `seq_len` tokens in `precision` (resolved)."""
    from soppu.data import public_text

    source = source or default_public(data)
    if source == "generated":
        config = default_generation(seq_len, seed, precision)
        return generated_text(base.model, base.tokenizer, config, progress)
    return public_text(None if source == "pool" else Path(source))
