"""The client's repair of its emulator: the loss's math, the repair, its teachers, its file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from helpers import tiny_causal_lm, tiny_tokenizer

from soppu import messages, teachers
from soppu.clients import task
from soppu.data import DataError, UserText
from soppu.emulator import EmulatorError, EmulatorPlan, build, save
from soppu.repair import (
    CHECK_EVERY,
    MIN_CLOSED,
    RepairConfig,
    TeacherAnswer,
    TeacherError,
    answer_from_logits,
    middle_state,
    partition_ce,
    repair,
)
from soppu.server.prepare_run import emulator_message
from soppu.teachers.api import ApiTeacher, parse
from soppu.teachers.local import LocalTeacher

V = 40


def test_the_partition_loss_is_the_coarsened_cross_entropy_and_the_teacher_its_minimum():
    """At the teacher's own logits the loss is the entropy of the teacher coarsened to {the 5
    listed, the text's token, the rest} (by hand), and no step of the logits lowers it."""
    torch.manual_seed(0)
    ids = torch.randint(0, V, (7,))
    teacher_logits = torch.randn(7, V) * 3
    answer = answer_from_logits(ids, teacher_logits)
    p = F.softmax(teacher_logits[:-1], -1)
    by_hand = []
    for t in range(6):
        listed = set(answer.top_ids[t].tolist()) | {int(ids[t + 1])}
        probs = [float(p[t, i]) for i in listed]
        rest = 1 - sum(probs)
        by_hand.append(-sum(q * math.log(q) for q in probs) - rest * math.log(rest))
    student = teacher_logits[None].clone().requires_grad_(True)
    loss = partition_ce(student, [answer])
    assert loss.item() == pytest.approx(sum(by_hand) / 6, rel=1e-5)
    loss.backward()
    assert student.grad.abs().max() < 1e-6
    worse = partition_ce(teacher_logits[None] + torch.randn(1, 7, V), [answer])
    assert worse.item() > loss.item()


def test_the_text_token_counts_once_where_it_is_among_the_listed():
    ids = torch.tensor([3, 4, 5])
    logits = torch.full((3, V), -10.0)
    logits[0, 4], logits[1, 5] = 5.0, 5.0  # the text's tokens are the likeliest
    answer = answer_from_logits(ids, logits)
    assert torch.equal(answer.top_ids[:, 0], ids[1:])
    q = F.softmax(logits[:-1], -1)
    top = answer.top_ids
    expected = -(q.gather(1, top) * q.gather(1, top).log()).sum(1)
    rest = 1 - q.gather(1, top).sum(1)
    expected = (expected - rest * rest.log()).mean()
    assert float(partition_ce(logits[None], [answer])) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(top_logprobs=torch.full((2, 5), 0.5)), "top_logprobs are not all finite"),
        (dict(token_logprobs=torch.tensor([-1.0, float("nan")])), "token_logprobs"),
        (dict(top_ids=torch.zeros(2, 4, dtype=torch.long)), "alternatives of shape"),
        (dict(token_logprobs=torch.tensor([-1.0])), "1 token logprobs for 2"),
        (dict(top_logprobs=torch.full((2, 5), -0.1)), "sum past 1"),
        (dict(ids=torch.tensor([1])), "at least 2 tokens"),
    ],
)
def test_an_answer_that_cannot_be_a_teachers_is_refused(change, words):
    good = dict(
        ids=torch.tensor([1, 2, 3]),
        top_ids=torch.arange(10).view(2, 5),
        top_logprobs=torch.full((2, 5), -3.0),
        token_logprobs=torch.tensor([-1.0, -2.0]),
    )
    TeacherAnswer(**good)
    with pytest.raises(TeacherError, match=words):
        TeacherAnswer(**{**good, **change})


def tiny_pair(seed: int = 0):
    full = tiny_causal_lm(6, seed=seed)
    emulator, info = build(full, EmulatorPlan(6, drop=0.5, select="even"), "tiny")
    return full, emulator, info


def answers_on(teacher, blocks) -> list[TeacherAnswer]:
    """A teacher far from the emulator: another random model, its logits sharpened."""
    with torch.no_grad():
        return [answer_from_logits(b, 4 * teacher(input_ids=b[None]).logits[0]) for b in blocks]


def gap(model, answers: list[TeacherAnswer], teacher) -> float:
    """The student's partition loss above the teacher's own (the coarsened KL)."""
    ids = torch.stack([a.ids for a in answers])
    with torch.no_grad():
        student = partition_ce(model(input_ids=ids).logits, answers)
        floor = partition_ce(4 * teacher(input_ids=ids).logits, answers)
    return float(student - floor)


def test_a_repair_moves_only_the_middle_layers_towards_the_teacher():
    torch.manual_seed(1)
    _, emulator, info = tiny_pair()
    teacher = tiny_causal_lm(6, seed=1)
    blocks = [torch.randint(0, 300, (16,)) for _ in range(8)]
    answers = answers_on(teacher, blocks)
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    gap_before = gap(emulator, answers, teacher)
    middle = set(middle_state(emulator, info))
    report = repair(emulator, info, answers, 0, RepairConfig(steps=30, lr=3e-3, batch_size=4))
    assert report.loss_last < report.loss_first and report.pieces == 8
    assert gap(emulator, answers, teacher) < 0.8 * gap_before  # measured: 0.65×
    after = emulator.state_dict()
    # embeddings, head and adapter layers stay the full model's: a LoRA still plugs in
    assert middle and all(torch.equal(before[k], after[k]) != (k in middle) for k in before)
    assert not any(p.requires_grad for p in emulator.parameters()) and not emulator.training
    beyond = TeacherAnswer(
        torch.tensor([1, 300]), torch.arange(5)[None], torch.full((1, 5), -3.0), torch.tensor([-4])
    )
    with pytest.raises(TeacherError, match="outside the model's vocabulary"):
        repair(emulator, info, [beyond], 0, RepairConfig(steps=1))


def own_answers(model, blocks) -> list[TeacherAnswer]:
    """What `model` itself answers: the partition loss is at its minimum there."""
    with torch.no_grad():
        return [answer_from_logits(b, model(input_ids=b[None]).logits[0]) for b in blocks]


def knowing(blocks) -> list[TeacherAnswer]:
    """A teacher that knows each block's text: its next token likelier than the rest (a full model
    far better on the text than the emulator: a gap for a repair to close)."""
    answers = []
    for block in blocks:
        logits = torch.randn(block.numel(), V if block.max() < V else 300) * 0.5
        logits[torch.arange(block.numel() - 1), block[1:]] += 2.0
        answers.append(answer_from_logits(block, logits))
    return answers


def test_a_repair_that_does_not_carry_to_the_validation_text_is_stopped_and_undone():
    """Validation answers the emulator itself gives: no gap to the full model there, nothing
    for a repair to close; the first look stops it, and every weight is as it was."""
    torch.manual_seed(2)
    _, emulator, info = tiny_pair()
    blocks = [torch.randint(0, 300, (16,)) for _ in range(8)]
    answers = answers_on(tiny_causal_lm(6, seed=1), blocks)
    check = own_answers(emulator, [torch.randint(0, 300, (16,)) for _ in range(4)])
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    config = RepairConfig(steps=3 * CHECK_EVERY, lr=3e-3, batch_size=4)
    report = repair(emulator, info, answers, 0, config, check=check)
    assert report.check.steps == CHECK_EVERY and report.check.closed == 0.0
    assert report.check.full == pytest.approx(report.check.before, rel=1e-5)
    assert not report.kept
    after = emulator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in emulator.parameters()) and not emulator.training


def test_a_repair_that_closes_the_gap_on_the_validation_text_is_kept():
    """Validation text of the training text's kind, a teacher that knows it: the emulator's
    loss there falls on every block, most of the way to the teacher's."""
    torch.manual_seed(3)
    _, emulator, info = tiny_pair()
    phrase = torch.randint(0, 300, (8,))
    blocks = [phrase.roll(i).repeat(2) for i in range(12)]  # one phrase, many phases
    answers, check = knowing(blocks[:8]), knowing(blocks[8:])
    config = RepairConfig(steps=2 * CHECK_EVERY, lr=3e-3, batch_size=4)
    report = repair(emulator, info, answers, 0, config, check=check)
    assert report.kept and report.check.steps == 2 * CHECK_EVERY
    assert report.check.gain.low > 0 and report.check.closed >= MIN_CLOSED
    assert report.check.full < report.check.after < report.check.before
    with torch.no_grad():  # what the check says of the emulator, it is
        ids = torch.stack([a.ids for a in check])
        nll = F.cross_entropy(
            emulator(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        )
    assert float(nll) == pytest.approx(report.check.after, rel=1e-4)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"repair-steps": 10**9}, "repair steps"),
        ({"repair-lr": float("nan")}, "repair lr"),
        ({"repair-lr": 5.0}, "repair lr"),
        ({"train.batch_size": 0}, "batch size"),
    ],
)
def test_a_repair_the_server_asks_for_is_read_back_and_its_numbers_checked(values, words):
    base = {
        **messages.repair_fields(40, 3e-4),
        "train.batch_size": 4,
        "train.seed": 7,
        "train.precision": "fp32",
    }
    asked = messages.repair_from(ConfigRecord(base))
    assert asked == RepairConfig(steps=40, lr=3e-4, batch_size=4, seed=7, precision="fp32")
    assert messages.repair_fields(0, 3e-4) == {}
    assert messages.repair_from(ConfigRecord({**base, "repair-steps": 0})) is None
    with pytest.raises(ValueError, match=words):
        messages.repair_from(ConfigRecord({**base, **values}))


def test_a_vllm_style_answer_keeps_the_k_likeliest_and_refuses_names_that_are_not_ids():
    logprobs = {
        "tokens": ["token_id:5", "token_id:9", "token_id:2"],
        "token_logprobs": [None, -0.5, -6.0],
        "top_logprobs": [
            None,
            {f"token_id:{i}": -0.5 - n for n, i in enumerate((9, 1, 2, 3, 4))},
            # vLLM lists the text's own token beside the 5 likeliest
            {**{f"token_id:{10 + n}": -1.0 - n for n in range(5)}, "token_id:2": -6.0},
        ],
    }
    answer = parse(logprobs)
    assert answer.ids.tolist() == [5, 9, 2]
    assert answer.top_ids.tolist() == [[9, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    assert answer.token_logprobs.tolist() == [-0.5, -6.0]
    assert parse({**logprobs, "tokens": ["token_id:5"]}) is None
    with pytest.raises(TeacherError, match="not written token_id"):
        parse({**logprobs, "tokens": ["token_id:5", "hello", "token_id:2"]})
    short = [None, {"token_id:1": -1.0}, {"token_id:1": -1.0}]
    with pytest.raises(TeacherError, match="1 alternatives"):
        parse({**logprobs, "top_logprobs": short})


def test_a_node_finds_its_teacher_and_a_real_node_without_one_says_so():
    assert isinstance(teachers.for_node({"partition-id": 0}, "tiny", "fp32"), LocalTeacher)
    named = teachers.for_node(
        {"user-id": "u", "teacher-url": "http://127.0.0.1:9", "teacher-model": "base"}, "", "fp32"
    )
    assert isinstance(named, ApiTeacher) and named.model == "base"
    with pytest.raises(teachers.NoTeacher, match="teacher-url"):
        teachers.for_node({"user-id": "u"}, "tiny", "fp32")


def token_ids(texts: list[str]) -> list[torch.Tensor]:
    tokenizer = tiny_tokenizer()
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


class KnowingTeacher:
    """A node's teacher that knows the texts it is asked about (`knowing`)."""

    kind = "local"

    def answer(self, texts: list[str]) -> list[TeacherAnswer]:
        return knowing(token_ids(texts))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """An emulator of a tiny model on this node, and that model's folder (the teacher's)."""
    monkeypatch.setenv("SOPPU_CACHE", str(tmp_path / "client-cache"))
    task._EMULATORS.clear()
    task.tokenizer_for.cache_clear()
    full_dir = tmp_path / "model"
    tiny_causal_lm(6).save_pretrained(full_dir)
    tiny_tokenizer().save_pretrained(full_dir)
    _, emulator, info = tiny_pair()
    folder = save(emulator, info, tmp_path / "emulator")
    task.install(*messages.emulator_files(emulator_message(folder)))
    yield info, str(full_dir)
    task._EMULATORS.clear()
    task.tokenizer_for.cache_clear()


def test_a_node_repairs_once_keeps_the_repair_and_finds_it_after_a_restart(installed):
    info, model_dir = installed
    sentence = "the quick brown fox jumps over the lazy dog. "
    user = UserText("alice", sentence * 80, "held out", validation=sentence * 12)
    asked = []

    def teacher():
        asked.append(1)
        return KnowingTeacher()

    config = RepairConfig(steps=10, lr=3e-3, batch_size=2, seed=3)
    model, _, report = task.repaired(user, info.version, config, 32, model_dir, teacher)
    assert report is not None and report.pieces == 20 and asked == [1] and report.kept
    assert task.held_versions() == [info.version]  # what the node tells the server it holds
    path = task.emulator_root() / info.version / "repairs" / f"alice-{config.key()}.safetensors"
    assert path.is_file()
    ids = torch.arange(30)[None]
    with torch.no_grad():
        repaired_logits = model(input_ids=ids).logits
        pristine_logits = task.emulator(info.version)[0](input_ids=ids).logits
    assert not torch.allclose(repaired_logits, pristine_logits)
    task._EMULATORS.clear()  # a restarted node
    again, _, report = task.repaired(user, info.version, config, 32, model_dir, teacher)
    assert report is None and asked == [1]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, repaired_logits)
    other = RepairConfig(steps=6, lr=1e-3, batch_size=2, seed=3)  # another setting: anew
    assert task.repaired(user, info.version, other, 32, model_dir, teacher)[2] is not None
    task._EMULATORS.clear()
    path.write_bytes(path.read_bytes()[:100])  # not safetensors any more
    with pytest.raises(Exception, match=r"header|safetensors|deserializ"):
        task.repaired(user, info.version, config, 32, model_dir, teacher)


def test_a_node_records_a_repair_it_undid_and_trains_on_the_emulator_as_sent(installed):
    """A teacher whose answers on the validation text are the emulator's own: no gap for the
    repair to close there, so it is undone, recorded, and never made again."""
    info, model_dir = installed
    sentence = "a node whose text the repair cannot help. "
    user = UserText("dave", sentence * 60, "held out", validation=sentence * 8)
    pristine = task.emulator(info.version)[0]
    calls = []

    class Teacher(KnowingTeacher):
        def answer(self, texts):
            calls.append(len(texts))
            if len(calls) == 1:  # the training text: a teacher far from the emulator
                return super().answer(texts)
            return own_answers(pristine, token_ids(texts))

    config = RepairConfig(steps=3 * CHECK_EVERY, lr=3e-3, batch_size=2)
    model, _, report = task.repaired(user, info.version, config, 32, model_dir, Teacher)
    assert not report.kept and report.check.steps == CHECK_EVERY and len(calls) == 2
    path = task.emulator_root() / info.version / "repairs" / f"dave-{config.key()}.safetensors"
    assert path.is_file()
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, pristine(input_ids=ids).logits)
    task._EMULATORS.clear()  # a restarted node: the record, no second repair
    again, _, report = task.repaired(user, info.version, config, 32, model_dir, Teacher)
    assert report is None and len(calls) == 2
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, pristine(input_ids=ids).logits)
    without = UserText("erin", sentence * 60, "held out")  # no validation text: no check
    with pytest.raises(DataError, match="no validation text to check a repair on"):
        task.repaired(without, info.version, config, 32, model_dir, Teacher)


def test_an_unreachable_teacher_is_a_repair_failure_and_leaves_nothing_behind(installed):
    info, model_dir = installed
    text = "text the node would repair on, more and more. "
    user = UserText("carol", text * 60, "held out", validation=text * 4)
    config = RepairConfig(steps=2, lr=1e-3, batch_size=2)
    with pytest.raises(TeacherError, match="cannot reach the server"):
        task.repaired(
            user, info.version, config, 32, model_dir, lambda: ApiTeacher("http://127.0.0.1:9", "m")
        )
    assert not (task.emulator_root() / info.version / "repairs").exists()  # nothing half-made


def test_a_repair_file_of_another_emulator_is_refused_by_name(installed):
    info, model_dir = installed
    user = UserText("bob", "some text to repair on, again and again. " * 60, "held out")
    config = RepairConfig(steps=2, lr=1e-3, batch_size=2)
    path = task.emulator_root() / info.version / "repairs" / f"bob-{config.key()}.safetensors"
    path.parent.mkdir()
    from safetensors.torch import save_file

    save_file({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(EmulatorError, match="not this emulator's middle layers"):
        task.repaired(user, info.version, config, 32, model_dir, lambda: None)


def test_the_local_teacher_answers_what_the_full_model_says(installed):
    _, model_dir = installed
    texts = ["the quick brown fox", "x", "jumps over the lazy dog"]
    answers = LocalTeacher(model_dir).answer(texts)
    assert len(answers) == 2  # one token predicts nothing
    tokenizer = tiny_tokenizer()
    full = tiny_causal_lm(6)
    for text, answer in zip([texts[0], texts[2]], answers, strict=True):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert torch.equal(answer.ids, ids)
        with torch.no_grad():
            expected = answer_from_logits(ids, full(input_ids=ids[None]).logits[0])
        assert torch.equal(answer.top_ids, expected.top_ids)
        assert torch.allclose(answer.token_logprobs, expected.token_logprobs, atol=1e-5)


def test_the_server_says_what_a_reply_reports_of_a_repair_even_a_partial_one():
    from soppu.server.federation import repair_line

    reply = {
        "repair-seconds": 80.4, "repair-pieces": 65, "repair-steps-taken": 40,
        "repair-loss-first": 2.094, "repair-loss-last": 1.171, "repair-kept": 1,
        "repair-check-before": 3.9, "repair-check-after": 3.3, "repair-check-full": 2.7,
        "repair-check-closed": 0.5,
        "repair-check-gain": 0.4512, "repair-check-low": 0.40, "repair-check-high": 0.50,
    }  # fmt: skip
    assert repair_line(reply) == (
        "repaired its emulator on 65 pieces of its training text (40 steps, 80 s), partition "
        "loss there 2.094 → 1.171; on its validation text the emulator's loss 3.900 → 3.300, "
        "the full model's 2.700 (50% of the gap closed; perplexity +45.1%, 95% +40.0% to "
        "+50.0%): kept"
    )
    assert repair_line({**reply, "repair-kept": 0}).endswith("undone, the emulator as sent")
    # a hostile client's reply may leave any of them out: the server's log line still comes
    assert repair_line({"repair-seconds": 3.0}).startswith("repaired its emulator on 0 pieces")
