"""How a store's 4-bit codes are best written: the bytes and seconds of each lossless coder.

    python -m experiments.code_coding --runs s17-fortunes6,s17-roles6 --name s18

For every 4-bit tensor of each run's compressed store (RUN/compressed/vNNNN), the codes as
read back, packed two to a byte (format 1's raw pairs), then coded by: Huffman-only deflate
(what the store writes since format 2), deflate with string matching (zlib level 6), LZMA and
bzip2. Beside them the order-0 entropy of the codes (the bound for a coder of single codes)
and of the packed bytes. Bytes are summed over the store's codes; scales are not counted (no
coder touches them). Writes experiments/results/code_coding[_NAME].json and .md.
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import time
import zlib

import torch

from experiments.lib import RESULTS, RUNS, provenance, refuse_other_settings, write_results
from soppu.compression.storage import Quantized, _pack4
from soppu.server.compressed_store import CompressedStore

CODERS = {
    "raw pairs (format 1)": lambda data: data,
    "Huffman-only deflate (the store)": None,  # Quantized.packed(), as the store writes it
    "deflate, level 6": lambda data: zlib.compress(data, 6),
    "LZMA, preset 9": lambda data: lzma.compress(data, preset=9),
    "bzip2, level 9": lambda data: bz2.compress(data, 9),
}


def four_bit_codes(run: str) -> list[Quantized]:
    """Every 4-bit tensor of the run's latest compressed store, as read back."""
    from safetensors.torch import load_file

    root = sorted((RUNS / run / "compressed").glob("v*"))[-1]
    found = []
    for entry in CompressedStore(root).verified()["slots"]:
        if entry.get("bits") != 4:
            continue
        tensors = load_file(root / entry["file"])
        for name, shape in entry["shapes"].items():
            found.append(
                Quantized.unpacked(
                    tensors[f"{name}.codes"],
                    tensors[f"{name}.scales"],
                    4,
                    tuple(shape),
                    entry.get("codec", "raw"),
                )
            )
    return found


def entropy_bits(values: torch.Tensor, symbols: int) -> float:
    """Order-0 entropy of `values` in bits, summed over them."""
    counts = torch.bincount(values.flatten().long(), minlength=symbols).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) * values.numel()


def measure(codes: list[Quantized]) -> dict:
    raw = [_pack4(q.codes).numpy().tobytes() for q in codes]
    row = {"tensors": len(codes), "codes": sum(q.codes.numel() for q in codes)}
    for name, coder in CODERS.items():
        began = time.perf_counter()
        if coder is None:
            size = sum(Quantized(q.codes, q.scales, 4).packed().numel() for q in codes)
        else:
            size = sum(len(coder(data)) for data in raw)
        row[name] = {"bytes": size, "seconds": time.perf_counter() - began}
    row["entropy of the codes"] = sum(entropy_bits(q.codes + 8, 16) for q in codes) / 8
    row["entropy of the packed bytes"] = (
        sum(entropy_bits(torch.frombuffer(bytearray(data), dtype=torch.uint8), 256) for data in raw)
        / 8
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="runs with a 4-bit compressed store")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    target = RESULTS / ("code_coding" + (f"_{args.name}" if args.name else "") + ".json")
    settings = {"runs": args.runs}
    refuse_other_settings(target, settings)
    results = {run: measure(four_bit_codes(run)) for run in args.runs.split(",")}
    lines = [
        "Bytes of each store's 4-bit codes under each lossless coder, as a share of the raw "
        "pairs, and the seconds it took over all of them.",
        "",
        "| run | codes | " + " | ".join(CODERS) + " | entropy: codes / packed bytes |",
        "|---|---|" + "---|" * len(CODERS) + "---|",
    ]
    for run, row in results.items():
        raw = row["raw pairs (format 1)"]["bytes"]
        cells = [f"{row[n]['bytes'] / raw:.3f} ({row[n]['seconds']:.3f} s)" for n in CODERS]
        codes, packed = row["entropy of the codes"], row["entropy of the packed bytes"]
        entropy = f"{codes / raw:.3f} / {packed / raw:.3f}"
        lines.append(f"| {run} | {row['codes']:,} | " + " | ".join(cells) + f" | {entropy} |")
    write_results(
        target,
        {**provenance(__file__), "settings": settings, "results": results},
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
