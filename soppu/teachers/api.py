"""The serving API's answer to scoring the user's text: OpenAI's legacy completions with
`echo`, `max_tokens: 0`, `logprobs: 5` and vLLM's `return_tokens_as_token_ids`, which `soppu
serve` and vLLM both answer. The text goes where it goes whenever the user scores it (`soppu
score`), and nowhere else; the answer is checked before it is used."""

from __future__ import annotations

import torch

from soppu.completions import base_model_id, echoed_logprobs
from soppu.errors import SoppuError
from soppu.repair import TOP_K, TeacherAnswer, TeacherError


class ApiTeacher:
    kind = "api"

    def __init__(self, url: str, model: str = "", api_key: str | None = None) -> None:
        self.url, self.api_key = url, api_key
        self.model = model or base_model_id(url, api_key)
        if not self.model:
            raise SoppuError(f"{url}: no base model id at /info: name it (teacher-model)")

    def answer(self, texts: list[str]) -> list[TeacherAnswer]:
        answers = []
        for text in texts:
            logprobs = echoed_logprobs(
                self.url,
                self.model,
                text,
                self.api_key,
                logprobs=TOP_K,
                return_tokens_as_token_ids=True,
            )
            try:
                answer = parse(logprobs)
            except (TeacherError, KeyError, TypeError, ValueError) as exc:
                raise SoppuError(f"{self.url}: model {self.model!r}: bad answer: {exc}") from None
            if answer is not None:
                answers.append(answer)
        return answers


def parse(logprobs: dict) -> TeacherAnswer | None:
    """A `logprobs` object with tokens as "token_id:<id>" → the answer (None: < 2 tokens)."""
    ids = [token_id(t) for t in logprobs["tokens"]]
    if len(ids) < 2:
        return None
    scores, tops = logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
    if len(scores) != len(ids) - 1 or len(tops) != len(ids) - 1:
        raise TeacherError(f"{len(ids)} tokens, {len(scores)} logprobs, {len(tops)} alternatives")
    top_ids, top_logprobs = [], []
    for top in tops:
        # vLLM lists the text's own token beside the k likeliest: keep the k likeliest
        best = sorted(((float(v), token_id(t)) for t, v in top.items()), reverse=True)[:TOP_K]
        if len(best) < TOP_K:
            raise TeacherError(f"{len(best)} alternatives for a token, asked for {TOP_K}")
        top_logprobs.append([v for v, _ in best])
        top_ids.append([i for _, i in best])
    return TeacherAnswer(
        torch.tensor(ids),
        torch.tensor(top_ids),
        torch.tensor(top_logprobs, dtype=torch.float32),
        torch.tensor([float(s) for s in scores], dtype=torch.float32),
    )


def token_id(token: str) -> int:
    prefix, _, number = str(token).partition("token_id:")
    if prefix or not number.isdigit():
        raise TeacherError(f"token {str(token)[:40]!r} is not written token_id:<id>")
    return int(number)
