"""Text no user owns, which the emulator is aligned and the gradient correction measured on: one
setting (`public`) for the federation, `soppu personalize` and `soppu emulator build`.

    generated   the full model's own samples (data-free: no one's text, every domain it knows)
    pool        the embedded pool: Shakespeare speeches no single role owns
    FILE        JSONL/CSV/Parquet with a `text` column
    ""          the default, DEFAULT_PUBLIC (chosen by experiments/populations_gains.py)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from soppu.generated import generated_text

DEFAULT_PUBLIC = "generated"
SOURCES = ("generated", "pool")  # anything else is a file


def describe(source: str) -> str:
    """What `source` is, in words, for the log."""
    source = source or DEFAULT_PUBLIC
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
    *,
    seq_len: int = 128,
    seed: int = 0,
    precision: str = "fp32",
    progress: Callable[[int, int, float], None] = lambda *_: None,
) -> list[str]:
    """The texts of `source` ("" for the default); `base` (a BaseModel) writes them for
    `generated`, as samples of `seq_len` tokens in `precision` (resolved)."""
    from soppu.data import public_text

    source = source or DEFAULT_PUBLIC
    if source == "generated":
        config = default_generation(seq_len, seed, precision)
        return generated_text(base.model, base.tokenizer, config, progress)
    return public_text(None if source == "pool" else Path(source))
