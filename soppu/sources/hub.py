"""A Hugging Face dataset, read as flwr-datasets' `FederatedDataset` reads one: `hf:NAME` or
`hf:NAME@SUBSET`, its train split (`hf:flwrlabs/shakespeare` with `--user-column
character_id --text-column x` is LEAF's Shakespeare). NAME may also be a local dataset folder,
which `datasets` reads as it reads a Hub repository (and offline, from its cache)."""

from __future__ import annotations

from typing import Any, ClassVar

from soppu.sources.base import DataError


class HubSource:
    prefix: ClassVar[str] = "hf:"

    def __init__(self, spec: str) -> None:
        self.name, _, self.subset = spec.partition("@")
        if not self.name:
            raise DataError("hf: needs a dataset name, as in hf:flwrlabs/shakespeare")
        self.label = f"hf:{spec}"

    def rows(self) -> Any:
        import datasets

        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset(self.name, self.subset or None, split="train")
        except Exception as exc:  # unreachable Hub, unknown name, no train split, bad files
            raise DataError(f"{self.label}: cannot load its train split ({exc})") from None
