"""What a fitted slot stores, optionally quantised, and how it reads back.

A slot stores its bases U, V and every core in the cheapest exact form (`core_form`): dense
r_U × r_V cores, or the r_U × k times k × r_V product when k·(r_U + r_V) < r_U·r_V, or the r
numbers of a diagonal core. With `bits` 8 or 4 every stored tensor becomes integer codes with
a float16 scale per column (symmetric, absmax): each basis column, and each user's core
columns along its longer side, so a small user's core is never coded on a big user's scale
and a scale always covers enough numbers to cost little. 4-bit codes are packed two to a
byte and then Huffman-coded (zlib's deflate, Huffman only): codes near zero are far more
common than the extremes, so the packed bytes carry ≈ 3.1 bits per code, and the coding is
lossless. Sizes are counted in bytes as written, codes and scales both.

Reading back gives orthonormal bases and per-item cores whatever was stored: quantised bases
are no longer orthonormal, so U' = Q_u R_u and V' = Q_v R_v are re-factored and the R's folded
into each core, which keeps the error accounting of `residuals.py` exact for what was stored.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from soppu.compression.joint import SlotFit
from soppu.compression.methods import method_named
from soppu.compression.residuals import OrthoForm

BITS = (32, 8, 4)
FORMS = ("dense", "factored", "diag")
CODECS = ("raw", "deflate")  # how codes lie on disk: as they are, or Huffman-coded


def codec_for(bits: int) -> str:
    """What this version writes: 4-bit codes deflated (≈ 22% fewer bytes); 8-bit codes raw,
    so that serving can read one user's core rows without decoding the rest."""
    return "deflate" if bits == 4 else "raw"


def stored_floats(fit: SlotFit) -> tuple[dict[str, Tensor], str]:
    """The tensors a slot keeps, in float, and the core form: as the fit's method keeps them."""
    floats, form = method_named(fit.sigma).stored_floats(fit)
    if form not in FORMS:
        raise ValueError(f"method {fit.sigma!r} stores cores as {form!r}, not one of {FORMS}")
    return floats, form


def reduced_axis(name: str, shape: tuple[int, ...]) -> int:
    """The axis one scale covers: a basis column (its rows); a user's core column along the
    core's longer side; a user's diagonal core whole."""
    if name in ("U", "V"):
        return 0
    if name == "sigma":
        return 1
    return 1 if shape[1] >= shape[2] else 2  # cores, core_left, core_right: N × a × b


@dataclass
class Quantized:
    codes: Tensor  # int8, one per number (4-bit codes are packed only on disk)
    scales: Tensor  # float16, the tensor's shape with the reduced axis of size 1
    bits: int
    _written: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.packed().numel() + self.scales.numel() * 2

    def packed(self) -> Tensor:
        """The codes as the file holds them (`codec_for(bits)`): int8, or 4-bit pairs packed
        in uint8 and deflated."""
        if self.bits != 4:
            return self.codes
        if self._written is None:  # coded once: sizing and writing both ask
            self._written = _deflate(_pack4(self.codes))
        return self._written

    @staticmethod
    def unpacked(
        codes: Tensor, scales: Tensor, bits: int, shape: tuple[int, ...], codec: str = "raw"
    ) -> Quantized:
        """From the file's tensors; `codec` as the slot's manifest entry says (a store of
        format 1 wrote 4-bit codes raw)."""
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not one of {CODECS}")
        if bits != 4:
            if codec != "raw":
                raise ValueError(f"{bits}-bit codes are stored raw, not {codec!r}")
            return Quantized(codes, scales, bits)
        if codec == "deflate":
            codes = _inflate(codes, (_numel(shape) + 1) // 2)
        elif codes.numel() != (_numel(shape) + 1) // 2:
            raise ValueError(f"{codes.numel()} bytes of 4-bit codes for a tensor of shape {shape}")
        return Quantized(_unpack4(codes, shape), scales, bits)

    def cat(self, other: Quantized) -> Quantized:
        """Rows appended (axis 0): each row keeps its own scales."""
        return Quantized(
            torch.cat([self.codes, other.codes]), torch.cat([self.scales, other.scales]), self.bits
        )


def quantize(tensor: Tensor, bits: int, axis: int) -> Quantized:
    """Symmetric absmax quantisation with one scale per slice along `axis`."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4 to quantise, got {bits}")
    levels = 2 ** (bits - 1) - 1  # 127 or 7: zero is exact, the range symmetric
    x = tensor.detach().float().cpu()
    peak = x.abs().amax(dim=axis, keepdim=True)
    # The scale as float16 stores it (rounded up, so the largest value stays in range); codes
    # are computed against that very scale.
    scales = (peak / levels).clamp(6e-8, 6e4).to(torch.float16)
    scales = torch.where(scales.float() * levels < peak, scales.float() * (1 + 2**-10), scales)
    scales = scales.to(torch.float16)
    codes = torch.round(x / scales.float()).clamp(-levels, levels).to(torch.int8)
    return Quantized(codes, scales, bits)


def dequantize(q: Quantized) -> Tensor:
    return q.codes.float() * q.scales.float()


def _pack4(codes: Tensor) -> Tensor:
    flat = (codes.flatten().to(torch.int16) + 8).to(torch.uint8)  # -7..7 → 1..15
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _deflate(packed: Tensor) -> Tensor:
    """Huffman coding alone (no string matching: codes have no repeats worth finding) in a
    zlib stream, whose checksum catches a corrupt file on reading."""
    coder = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = coder.compress(packed.numpy().tobytes()) + coder.flush()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _inflate(data: Tensor, size: int) -> Tensor:
    """Exactly `size` bytes back, or a ValueError: never more (a stream that inflates past
    what the shape needs is refused without being expanded)."""
    decoder = zlib.decompressobj()
    try:
        out = decoder.decompress(data.contiguous().numpy().tobytes(), size)
    except zlib.error as exc:
        raise ValueError(f"4-bit codes do not inflate ({exc})") from None
    if len(out) != size or not decoder.eof or decoder.unconsumed_tail:
        raise ValueError(f"4-bit codes inflate to other than the {size} bytes their shape needs")
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)


def _unpack4(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    flat = torch.stack([low, high], dim=1).flatten()[: _numel(shape)]
    return (flat.to(torch.int16) - 8).to(torch.int8).view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass
class SlotStorage:
    """A slot as stored: float tensors (bits 32) or quantised ones, and its core form."""

    form: str
    bits: int
    floats: dict[str, Tensor]  # bits 32
    quantized: dict[str, Quantized]  # bits 8 or 4

    @staticmethod
    def of(fit: SlotFit, bits: int = 32) -> SlotStorage:
        floats, form = stored_floats(fit)
        return SlotStorage.coded(form, bits, floats)

    @staticmethod
    def coded(form: str, bits: int, floats: dict[str, Tensor]) -> SlotStorage:
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if bits == 32:
            return SlotStorage(form, bits, floats, {})
        quantized = {
            k: quantize(v, bits, reduced_axis(k, tuple(v.shape))) for k, v in floats.items()
        }
        return SlotStorage(form, bits, {}, quantized)

    @staticmethod
    def from_file(
        form: str,
        bits: int,
        tensors: dict[str, Tensor],
        shapes: dict[str, list[int]],
        codec: str = "raw",
    ) -> SlotStorage:
        """A slot as `tensors()` wrote it, its codes in `codec`."""
        if bits == 32:
            return SlotStorage(form, bits, dict(tensors), {})
        quantized = {
            name: Quantized.unpacked(
                tensors[f"{name}.codes"], tensors[f"{name}.scales"], bits, tuple(shape), codec
            )
            for name, shape in shapes.items()
        }
        return SlotStorage(form, bits, {}, quantized)

    def with_rows(self, new: dict[str, Tensor]) -> SlotStorage:
        """New users' per-user tensors (cores, core factors or sigma; float, in the stored
        bases' coordinates) appended after the old users'; bases and old rows unchanged."""
        added = SlotStorage.coded(self.form, self.bits, new)
        if self.bits == 32:
            floats = dict(self.floats)
            for name, tensor in added.floats.items():
                floats[name] = torch.cat([floats[name], tensor.to(floats[name])])
            return SlotStorage(self.form, self.bits, floats, {})
        quantized = dict(self.quantized)
        for name, q in added.quantized.items():
            quantized[name] = quantized[name].cat(q)
        return SlotStorage(self.form, self.bits, {}, quantized)

    @property
    def nbytes(self) -> int:
        floats = sum(t.numel() * 4 for t in self.floats.values())
        return floats + sum(q.nbytes for q in self.quantized.values())

    def tensors(self) -> dict[str, Tensor]:
        """What goes into the slot's file: floats, or `NAME.codes` and `NAME.scales`."""
        out = {k: v.detach().float().cpu().contiguous() for k, v in self.floats.items()}
        for name, q in self.quantized.items():
            out[f"{name}.codes"] = q.packed().contiguous()
            out[f"{name}.scales"] = q.scales.contiguous()
        return out

    @property
    def codec(self) -> str:
        """How `tensors()` writes the codes."""
        return codec_for(self.bits)

    def shapes(self) -> dict[str, list[int]]:
        """The quantised tensors' shapes (4-bit codes are packed flat)."""
        return {name: list(q.shape) for name, q in self.quantized.items()}

    def form_read_back(self, device: torch.device | str = "cpu", start: int = 0) -> OrthoForm:
        """The cores from item `start` on as read back, in orthonormal bases: what serving
        reconstructs."""
        reader = SlotReader(
            self.form, self.bits, self.tensors().__getitem__, self.shapes(), codec=self.codec
        )
        cores = reader.all_cores(start)
        return OrthoForm(reader.Qu.to(device), reader.Qv.to(device), cores.to(device))


Getter = Callable[[str], Tensor]


class SlotReader:
    """Orthonormal bases and per-item cores from a slot's stored tensors, read by `get`
    (a file's tensors, or a dict's); cores one item at a time via `slice_of`."""

    def __init__(
        self,
        form: str,
        bits: int,
        get: Getter,
        shapes: dict[str, list[int]],
        slice_of: Callable[[str, int], Tensor] | None = None,
        codec: str = "raw",
    ):
        if form not in FORMS:
            raise ValueError(f"core form {form!r} is not one of {FORMS}")
        self.form, self.bits, self._get, self._shapes = form, bits, get, shapes
        self._codec = codec
        self._slice = slice_of
        self._decoded: dict[str, Tensor] = {}  # 4-bit tensors, decoded once
        U, V = self._tensor("U"), self._tensor("V")
        self._R: tuple[Tensor, Tensor] | None = None
        if form == "diag" or bits != 32:  # not orthonormal as stored: re-factor
            self.Qu, Ru = torch.linalg.qr(U)
            self.Qv, Rv = torch.linalg.qr(V)
            self._R = (Ru, Rv)
        else:
            self.Qu, self.Qv = U, V

    def bases(self) -> tuple[Tensor, Tensor]:
        """U and V as stored (dequantised): what diagonal cores multiply."""
        return self._tensor("U"), self._tensor("V")

    def to_stored_coordinates(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """Core factors in the bases (Qu, Qv) → in the stored U, V: L ↦ Ru⁻¹L, R ↦ R Rv⁻ᵀ,
        so that reading them back (which folds the R's in) returns L and R."""
        if self._R is None:
            return left, right
        Ru, Rv = self._R
        left = torch.linalg.solve_triangular(Ru, left, upper=True)
        right = torch.linalg.solve_triangular(Rv, right.transpose(1, 2), upper=True)
        return left, right.transpose(1, 2)

    def core(self, index: int) -> Tensor:
        """Item `index`'s r_U × r_V core in the bases (Qu, Qv)."""
        if self.form == "dense":
            core = self._item("cores", index)
        elif self.form == "factored":
            core = self._item("core_left", index) @ self._item("core_right", index)
        else:
            core = torch.diag(self._item("sigma", index))
        if self._R is None:
            return core
        Ru, Rv = self._R
        return Ru @ core @ Rv.T

    def all_cores(self, start: int = 0) -> Tensor:
        """Every core from item `start` on."""
        count = self._count()
        if count <= start:
            return torch.empty(0)
        return torch.stack([self.core(i) for i in range(start, count)])

    def _count(self) -> int:
        name = {"dense": "cores", "factored": "core_left", "diag": "sigma"}[self.form]
        if self.bits != 32:
            return self._shapes[name][0]
        return self._tensor(name).shape[0]

    def _tensor(self, name: str) -> Tensor:
        if self.bits == 32:
            return self._get(name).float()
        if name not in self._decoded:
            codes, scales = self._get(f"{name}.codes"), self._get(f"{name}.scales")
            shape = tuple(self._shapes[name])
            coded = Quantized.unpacked(codes, scales, self.bits, shape, self._codec)
            self._decoded[name] = dequantize(coded)
        return self._decoded[name]

    def _item(self, name: str, index: int) -> Tensor:
        if self.bits == 32 and self._slice is not None:
            return self._slice(name, index).float()
        if self.bits == 8 and self._slice is not None:
            codes = self._slice(f"{name}.codes", index)
            scales = self._slice(f"{name}.scales", index)
            return codes.float() * scales.float()
        return self._tensor(name)[index]  # 4-bit codes are packed flat: decoded once, whole
