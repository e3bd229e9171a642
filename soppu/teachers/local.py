"""The full model in the client's own process: what the serving API would answer, computed
here. Simulation only, where clients and server share a machine; a real node asks the API."""

from __future__ import annotations

import torch

from soppu import basemodel, lm
from soppu.repair import TOP_K, TeacherAnswer, answer_from_logits


class LocalTeacher:
    kind = "local"

    def __init__(self, base_model: str, precision: str = "fp32", batch_size: int = 4) -> None:
        self.base_model, self.precision, self.batch_size = base_model, precision, batch_size

    @torch.no_grad()
    def answer(self, texts: list[str]) -> list[TeacherAnswer]:
        full = basemodel.load(self.base_model or None)  # dropped once answered
        blocks = [
            torch.tensor(ids)
            for ids in full.tokenizer(texts, add_special_tokens=False)["input_ids"]
            if len(ids) >= 2
        ]
        answers = []
        for start in range(0, len(blocks), self.batch_size):
            rows = blocks[start : start + self.batch_size]
            logits = lm.logits(full.model, lm.collate(rows, 0), self.precision)
            answers += [
                answer_from_logits(ids, logits[i, : ids.numel()], TOP_K)
                for i, ids in enumerate(rows)
            ]
        return answers
