"""Tier 1 tests of adaptive_kv.tasks: token-exact lengths, needles, seeding, scorers, logit metrics."""

from __future__ import annotations

import collections
import math
import random
import re

import pytest
import torch

from adaptive_kv.tasks import (
    TASKS,
    NiahTask,
    NiahVariant,
    TaskSample,
    clean_prediction,
    get_task,
    kl_divergence,
    make_samples,
    passkey_match,
    perplexity,
    score_sample,
    string_match_all,
    top1_agreement,
)
from adaptive_kv.tasks import haystack as hs
from adaptive_kv.tasks.base import PieceEncoder
from adaptive_kv.tasks.common_words import INTRO as CWE_INTRO
from adaptive_kv.tasks.common_words import _fit_uncommon
from adaptive_kv.tasks.variable_tracking import INTRO as VT_INTRO

NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
# Lengths each task must hit exactly with the tiny 4k-vocab BPE; vt and cwe carry a one-shot
# example, so they start higher, and 4099 switches cwe to RULER's large-context repetitions.
LENGTHS = {name: (256, 513, 1024) for name in (*NIAH_TASKS, "passkey", "fidelity")}
LENGTHS["variable_tracking"] = (513, 1024, 2047)
LENGTHS["common_words"] = (1024, 2047, 4099)
CASES = [(name, length) for name, lengths in LENGTHS.items() for length in lengths]
N_SAMPLES = 3


@pytest.fixture(params=["no_bos", "bos"])
def tokenizer(request, tiny_tokenizer, tiny_tokenizer_bos):
    return tiny_tokenizer if request.param == "no_bos" else tiny_tokenizer_bos


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def test_every_task_has_a_length_table():
    assert set(LENGTHS) == set(TASKS)


# --- token-exact lengths and the prompt split -------------------------------------------------------------


@pytest.mark.parametrize(("name", "length"), CASES)
def test_lengths_are_token_exact(tokenizer, name, length):
    for sample in make_samples(name, tokenizer, length, N_SAMPLES, seed=7):
        assert len(sample.context_ids) + len(sample.question_ids) == length
        assert sample.context_length == length and len(sample.prompt_ids) == length
        assert sample.task == name and sample.max_new_tokens >= 0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bos_only_when_the_tokenizer_adds_it(tiny_tokenizer, tiny_tokenizer_bos, name):
    length = LENGTHS[name][0]
    bos_id = tiny_tokenizer.bos_token_id
    plain = make_samples(name, tiny_tokenizer, length, 1, seed=0)[0]
    with_bos = make_samples(name, tiny_tokenizer_bos, length, 1, seed=0)[0]
    assert bos_id not in plain.prompt_ids
    assert with_bos.context_ids[0] == bos_id and bos_id not in with_bos.context_ids[1:]


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"fidelity"}))
def test_question_holds_question_and_answer_prefix(tiny_tokenizer, name):
    sample = make_samples(name, tiny_tokenizer, LENGTHS[name][0], 1, seed=1)[0]
    context, question = _text(tiny_tokenizer, sample.context_ids), _text(tiny_tokenizer, sample.question_ids)
    # kvpress's split: the question starts at "What ..." / "Question: ..." and the context ends the text.
    assert question.startswith(("What", "Question:"))
    assert context.endswith("\n")
    assert re.search(r"(The pass key is|provided text (is|are)|they are: |list are:)$", question)


# --- needles: present once, answers derivable ---------------------------------------------------------------


@pytest.mark.parametrize("name", NIAH_TASKS)
@pytest.mark.parametrize("length", (256, 1024))
def test_niah_needles_once_and_answers_derivable(tokenizer, name, length):
    for sample in make_samples(name, tokenizer, length, N_SAMPLES, seed=3):
        context = _text(tokenizer, sample.context_ids)
        for needle in sample.metadata["needles"]:
            assert context.count(needle) == 1
        found = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", context)
        pairs = [re.match(r".* for (\S+) is: (\S+)\.$", n).groups() for n in sample.metadata["needles"]]
        per_key = collections.Counter(key for key, _ in pairs)
        for key, value in pairs:
            assert context.count(key) == per_key[key] and context.count(value) == 1
        expected = tuple(value for key in sample.metadata["query_keys"] for k, value in pairs if k == key)
        assert sorted(sample.answers) == sorted(expected)
        assert sorted(found) == sorted(pairs)
        for (start, end), needle in zip(sample.metadata["needle_spans"], _in_order(context, sample)):
            assert _text(tokenizer, sample.context_ids[start:end]).strip() == needle


def _in_order(context: str, sample: TaskSample) -> list[str]:
    return sorted(sample.metadata["needles"], key=context.index)


def test_niah_single_covers_every_value_type(tiny_tokenizer):
    for seed in (0, 1, 2):
        samples = make_samples("niah_single", tiny_tokenizer, 256, 3, seed=seed)
        assert {s.metadata["value_type"] for s in samples} == {"numbers", "words", "uuids"}
        assert {s.metadata["haystack"] for s in samples} == {"repeat", "prose"}


def test_passkey_line_once(tokenizer):
    for sample in make_samples("passkey", tokenizer, 513, N_SAMPLES, seed=4):
        (key,) = sample.answers
        context = _text(tokenizer, sample.context_ids)
        assert re.fullmatch(r"\d{5}", key)
        assert context.count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
        assert context.count(key) == 2  # both mentions sit in the one info line
        (start, end), = sample.metadata["needle_spans"]
        assert key in _text(tokenizer, sample.context_ids[start:end])


def test_passkey_depth_varies_with_seed(tiny_tokenizer):
    depths = {make_samples("passkey", tiny_tokenizer, 513, 1, seed=s)[0].metadata["depth"] for s in range(12)}
    assert len(depths) > 3


def test_variable_tracking_chain_resolves_to_answers(tokenizer):
    for sample in make_samples("variable_tracking", tokenizer, 1024, N_SAMPLES, seed=5):
        context = _text(tokenizer, sample.context_ids)
        task_part = context[context.rindex(VT_INTRO):]
        assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", task_part)
        assert len(assignments) == 5 and sample.metadata["value"] not in context[: context.rindex(VT_INTRO)]
        chain = [name for name, source in assignments if source == sample.metadata["value"]]
        for _ in range(4):
            chain += [name for name, source in assignments if source == f"VAR {chain[-1]}"]
        assert tuple(chain) == sample.answers
        assert all(context.count(f"VAR {name} =") == 1 for name in sample.answers)
        assert not set(sample.metadata["icl_names"]) & set(sample.answers)


def test_common_words_answers_are_the_most_frequent(tokenizer):
    for length in (1024, 4099):
        for sample in make_samples("common_words", tokenizer, length, 2, seed=6):
            context = _text(tokenizer, sample.context_ids)
            listing = context[context.rindex(CWE_INTRO) + len(CWE_INTRO):]
            entries = re.findall(r"(\d+)\. ([a-z]+)", listing)
            assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
            counts = collections.Counter(word for _, word in entries)
            reps = sample.metadata["common_reps"]
            assert all(counts[word] == reps for word in sample.answers)
            assert max(c for w, c in counts.items() if w not in sample.answers) < reps


def test_fidelity_is_prose_with_a_continuation(tokenizer):
    for sample in make_samples("fidelity", tokenizer, 256, N_SAMPLES, seed=8):
        assert len(sample.continuation_ids) == 128 and sample.answers == () and sample.question_ids == ()
        text = _text(tokenizer, sample.context_ids)
        assert text.startswith(hs.prose_paragraphs()[sample.metadata["start_paragraph"]][:40])
        with pytest.raises(ValueError, match="metric"):
            score_sample(sample, "anything")


# --- seeding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_samples(tiny_tokenizer, name):
    length = LENGTHS[name][1]
    assert make_samples(name, tiny_tokenizer, length, 2, seed=11) == make_samples(name, tiny_tokenizer, length, 2, 11)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_different_seeds_differ(tiny_tokenizer, name):
    length = LENGTHS[name][1]
    first, second = (make_samples(name, tiny_tokenizer, length, 1, seed=s)[0] for s in (1, 2))
    assert first.context_ids != second.context_ids
    if name != "fidelity":
        assert first.answers != second.answers


@pytest.mark.parametrize("name", ("niah_multikey", "niah_multivalue", "niah_multiquery", "fidelity"))
def test_prose_haystack_varies_with_seed(tiny_tokenizer, name):
    first, second = (make_samples(name, tiny_tokenizer, 1024, 1, seed=s)[0] for s in (1, 2))
    assert _outside_needles(first) != _outside_needles(second)


def _outside_needles(sample: TaskSample) -> tuple[int, ...]:
    ids, keep = sample.context_ids, [True] * len(sample.context_ids)
    for start, end in sample.metadata.get("needle_spans", ()):
        keep[start:end] = [False] * (end - start)
    return tuple(i for i, k in zip(ids, keep) if k)


# --- scorers ------------------------------------------------------------------------------------------------


def test_string_match_all_full_partial_none_case():
    refs = ["1234567", "Apple-Pie"]
    assert string_match_all("1234567 and apple-pie", refs) == 100.0
    assert string_match_all("only 1234567", refs) == 50.0
    assert string_match_all("nothing here", refs) == 0.0
    assert string_match_all("APPLE-PIE, 1234567", refs) == 100.0


def test_control_characters_handled_like_ruler():
    assert clean_prediction("\x00\t  answer: Apple\x1f\n") == "answer: Apple"
    assert string_match_all("\x07apple\x1b", ["apple"]) == 100.0
    # RULER turns control characters into newlines, so they cannot glue digits into a false match.
    assert clean_prediction("12\t34") == "12\n34"
    assert string_match_all("12\x0034", ["1234"]) == 0.0


def test_passkey_scoring():
    assert passkey_match(" 12345. Remember it.", "12345") == 100.0
    assert passkey_match("The key is 12345", "12345") == 100.0
    assert passkey_match("7 then 12345", "12345") == 100.0  # contained, though not the first integer
    assert passkey_match("123456", "12345") == 100.0  # contained, as Landmark's check allows
    assert passkey_match("54321", "12345") == 0.0
    assert passkey_match("", "12345") == 0.0


def test_score_sample_dispatches_on_metric(tiny_tokenizer):
    niah = make_samples("niah_multivalue", tiny_tokenizer, 513, 1, seed=0)[0]
    assert score_sample(niah, " ".join(niah.answers)) == 100.0
    assert score_sample(niah, niah.answers[0]) == 25.0
    passkey = make_samples("passkey", tiny_tokenizer, 256, 1, seed=0)[0]
    assert score_sample(passkey, f" {passkey.answers[0]}.") == 100.0
    assert score_sample(passkey, " 0.") == 0.0


# --- logit metrics ---------------------------------------------------------------------------------------------


def test_kl_divergence():
    logits = torch.randn(5, 17, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    ref, test = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    # KL([1/2, 1/2] || [3/4, 1/4]) = 0.5 ln(2/3) + 0.5 ln 2
    assert kl_divergence(ref, test) == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), rel=1e-9)
    assert kl_divergence(logits, torch.randn(5, 17)) > 0.0


def test_top1_agreement():
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert top1_agreement(ref, ref * 2) == 100.0
    assert top1_agreement(ref, -ref) == 0.0
    assert top1_agreement(ref, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])) == 50.0


def test_perplexity():
    vocab = 50
    targets = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    assert perplexity(torch.zeros(2, 7, vocab), targets) == pytest.approx(vocab, rel=1e-9)
    confident = torch.nn.functional.one_hot(targets, vocab).float() * 100.0
    assert perplexity(confident, targets) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4)), "test_logits"),
        (lambda: top1_agreement(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), "ref_logits"),
        (lambda: perplexity(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)), "target_ids"),
        (lambda: perplexity(torch.zeros(2, 3), torch.zeros(2)), "target_ids"),
        (lambda: perplexity(torch.zeros(2, 3), torch.tensor([0, 3])), "target_ids"),
    ],
)
def test_metric_input_errors(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# --- bad input ------------------------------------------------------------------------------------------------


def test_unknown_task_lists_names(tiny_tokenizer):
    with pytest.raises(ValueError, match="niah_single") as info:
        get_task("niah_single_9")
    assert "passkey" in str(info.value) and "common_words" in str(info.value)
    with pytest.raises(ValueError, match="task="):
        make_samples("nope", tiny_tokenizer, 256, 1, seed=0)


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"fidelity"}))
def test_too_short_context_names_the_minimum(tiny_tokenizer, name):
    with pytest.raises(ValueError, match=r"context_length=64 is below the minimum \d+ tokens"):
        make_samples(name, tiny_tokenizer, 64, 1, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"context_length": 0}, "context_length"),
        ({"context_length": 256.0}, "context_length"),
        ({"n_samples": -1}, "n_samples"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_make_samples_validates_arguments(tiny_tokenizer, kwargs, field):
    args = {"context_length": 256, "n_samples": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        make_samples("passkey", tiny_tokenizer, **args)


def test_task_configs_validate():
    with pytest.raises(ValueError, match="haystack="):
        NiahVariant("essay", "words", "numbers")
    with pytest.raises(ValueError, match="value_type="):
        NiahVariant("prose", "words", "floats")
    with pytest.raises(ValueError, match="num_queries"):
        NiahTask("bad", (NiahVariant("prose", "words", "numbers"),), num_keys=1, num_queries=2)


def test_fill_is_exact_and_never_overshoots(tiny_tokenizer):
    encoder = PieceEncoder(tiny_tokenizer)
    for budget in (0, 1, 7, 100, 333):
        units, pad = hs.fill(encoder, hs.unit_texts("repeat", random.Random(0), " "), budget)
        assert sum(len(u.ids) for u in units) + (len(pad.ids) if pad else 0) == budget
    with pytest.raises(ValueError, match="budget"):
        hs.fill(encoder, hs.unit_texts("repeat", random.Random(0), " "), -1)
    with pytest.raises(ValueError, match="kind="):
        hs.unit_texts("essay", random.Random(0), " ")


def test_common_words_pool_exhaustion_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="context_length"):
        _fit_uncommon(PieceEncoder(tiny_tokenizer), iter(["alpha", "beta"]), 10_000, 1, 3)
