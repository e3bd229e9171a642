"""The compression-method seam: the two methods behind it, and a third added as one class and
one registration line, run through compression, a store, `soppu add` and PEFT."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import torch
from helpers import tiny_population, write_users
from safetensors.torch import load_file

from soppu.compression import CompressionConfig, compress_slot
from soppu.compression.factors import LoRAFactors
from soppu.compression.joint import SlotFit, hosvd_start
from soppu.compression.methods import METHODS, method_named
from soppu.compression.project import project_full
from soppu.compression.residuals import OrthoForm, squared_errors
from soppu.server.add_users import add_adapters
from soppu.server.compress_store import compress_adapters
from soppu.server.compressed_store import CompressedStore
from soppu.server.publish import publish


class HosvdCores:
    """The truncated HOSVD with its optimal full cores, no refinement: a new method."""

    name: ClassVar[str] = "hosvd"
    help: ClassVar[str] = "hosvd: the HOSVD start only"

    def fit(self, stack, ranks, weights, *, tol, max_iters, init=None) -> SlotFit:
        start = hosvd_start(stack, ranks, weights)
        cores = (stack.S[:, :, None] * start.EU).transpose(1, 2) @ start.FV
        sq_errors = squared_errors(stack, OrthoForm(start.U, start.V, cores))
        bracket = start.bracket(weights, sq_errors)
        return SlotFit(start.U, start.V, self.name, cores, weights, bracket, sq_errors)

    def form(self, fit):
        return OrthoForm(fit.U, fit.V, fit.cores)

    def stored_floats(self, fit):
        return {"U": fit.U, "V": fit.V, "cores": fit.cores}, "dense"

    def core_params(self, k, r_u, r_v):
        return r_u * r_v

    def project(self, stack, reader, form):
        return project_full(stack, form.Qu, form.Qv)


@pytest.fixture
def hosvd(monkeypatch):
    monkeypatch.setitem(METHODS, HosvdCores.name, HosvdCores())  # the registration line


def items(count=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(24, 5, generator=g)
    return [
        LoRAFactors(torch.randn(k, 20, generator=g), shared @ torch.randn(5, k, generator=g), 1.0)
        for _ in range(count)
    ]


def test_a_new_method_fits_what_it_promises_and_counts_its_own_storage(hosvd):
    hosvd_result = compress_slot(items(), CompressionConfig(rank=4, sigma="hosvd"))
    refined = compress_slot(items(), CompressionConfig(rank=4, sigma="full"))
    bracket = hosvd_result.fit.bracket
    assert hosvd_result.fit.sigma == "hosvd" and hosvd_result.stored.form == "dense"
    assert bracket.achieved == pytest.approx(bracket.hosvd, rel=1e-6)  # the HOSVD, to fp32
    assert refined.fit.bracket.achieved <= bracket.achieved * (1 + 1e-9)  # refinement helps
    m, n = hosvd_result.shape
    assert hosvd_result.params_after() == 4 * (m + n) + 6 * 4 * 4  # its own core count


def test_a_new_method_goes_through_a_store_add_and_peft(hosvd, tmp_path, tiny_llama):
    from peft import PeftModel

    population = tiny_population(6, k=4, shared=6)
    paths = write_users(tmp_path / "adapters", population, rank=4, alpha=8)
    first = {u: paths[u] for u in sorted(paths)[:5]}
    compress_adapters(first, tmp_path / "store", CompressionConfig(rank=6, sigma="hosvd"))
    add_adapters(tmp_path / "store", {"user05": paths["user05"]}, tmp_path / "grown")
    manifest = CompressedStore(tmp_path / "grown").manifest()
    assert {entry["sigma"] for entry in manifest["slots"]} == {"hosvd"}
    version = publish(tmp_path / "grown", tmp_path / "serving", export_rank=32)

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = type(tiny_llama)(tiny_llama.config).eval()
    merged.load_state_dict(tiny_llama.state_dict())
    with torch.no_grad():
        for entry in manifest["slots"]:
            slot = CompressedStore(tmp_path / "grown").slot(entry)
            for i, (user, module) in enumerate(entry["items"]):
                if user == "user05":  # the added user, projected by the new method
                    delta = slot.form.Qu @ slot.core(i) @ slot.form.Qv.T
                    merged.get_submodule(module).weight += delta
        expected = merged(tokens).logits
    peft_model = PeftModel.from_pretrained(tiny_llama, version / "users" / "user05").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-4, atol=1e-5)
    state = load_file(version / "users" / "user05" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for t in state.values())


@pytest.mark.parametrize("name", ["full", "diag"])
def test_the_built_in_methods_stand_behind_the_seam(name):
    result = compress_slot(items(), CompressionConfig(rank=4, sigma=name))
    method = method_named(name)
    assert result.fit.sigma == name
    torch.testing.assert_close(result.form.cores, method.form(result.fit).cores)
    count, k, (r_u, r_v) = 6, 3, result.fit.ranks
    m, n = result.shape
    assert result.params_after() == r_u * m + r_v * n + count * method.core_params(k, r_u, r_v)


def test_an_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"sigma must be one of \('full', 'diag'\), got 'cp'"):
        CompressionConfig(rank=2, sigma="cp")


def test_the_command_line_lists_the_methods_without_loading_torch():
    code = (
        "import sys; import soppu.compression.methods as m; import soppu.server.config; "
        "print(list(m.METHODS), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['full', 'diag'] False"
