"""The task-data evaluator: answers scored given their prompts, references, generated answers, SQuAD's
exact match and F1, and the files it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from hftextgen.evaluate import answers
from hftextgen.evaluate.answers import Examples, score_answers
from hftextgen.generate import GenerateConfig
from hftextgen.model.tokenizer import bundled_gpt2, ready_for_lm

CONTEXT = 32
VOCAB = 300


def tiny_gpt2(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=CONTEXT, vocab_size=vocab)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def random_model():
    return tiny_gpt2(VOCAB)


@pytest.fixture(scope="module")
def tok():
    return ready_for_lm(bundled_gpt2(), "the bundled GPT-2 tokenizer")


@pytest.fixture(scope="module")
def text_model(tok):
    """A random GPT-2 with GPT-2's vocabulary, so that its answers decode to text."""
    return tiny_gpt2(len(tok), seed=1)


def random_examples(seed: int = 1) -> Examples:
    """Examples of several shapes: a prompt and one answer; a chat with two answers (spans); an
    answer with untrained tokens after it; a one-token prompt; a trained first token."""
    rng = np.random.default_rng(seed)
    spans = [[(6, 14)], [(3, 7), (12, 20)], [(5, 9)], [(1, 4)], [(0, 5)], [(10, 30)]]
    lengths = [14, 20, 13, 4, 9, 30]
    ids, masks = [], []
    for length, runs in zip(lengths, spans, strict=True):
        ids.append(rng.integers(1, VOCAB, length))
        mask = np.zeros(length, dtype=bool)
        for start, stop in runs:
            mask[start:stop] = True
        masks.append(mask)
    n_bytes = [int(m.sum()) * 3 for m in masks]
    return Examples(ids, masks, [f"ex{i}" for i in range(len(ids))], n_bytes, split_examples=10, split_tokens=500)


def brute_force(lm, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Each trained token t >= 1 scored alone from the tokens before it: no batches, no padding."""
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if not mask[t]:
            continue
        with torch.no_grad():
            logits = lm(torch.as_tensor(ids[:t], dtype=torch.long)[None]).logits[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[int(ids[t])].item()
        count += 1
    return total, count


def tiny_llama():
    """Llama-style: RoPE positions, grouped-query attention, RMSNorm."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=CONTEXT,
        vocab_size=VOCAB,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_scores_equal_a_token_by_token_brute_force_at_any_batch_size(random_model):
    check_against_brute_force(random_model)


def test_a_llama_style_model_scores_the_same_way():
    check_against_brute_force(tiny_llama())


def check_against_brute_force(random_model) -> None:
    examples = random_examples()
    reference = [brute_force(random_model, i, m) for i, m in zip(examples.ids, examples.masks, strict=True)]
    nll, counts = answers.score_examples(random_model, examples, batch_size=4)
    for got, tokens, (ref, ref_tokens) in zip(nll, counts, reference, strict=True):
        assert tokens == ref_tokens
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)
    total = sum(r for r, _ in reference)
    for batch_size in (1, 2, 3, 6, 64):  # and so: any padding
        result = score_answers(random_model, examples, batch_size)
        assert result["nll"] == pytest.approx(total, rel=1e-6)
        assert result["answer_tokens"] == sum(c for _, c in reference)
        assert result["answers"] == len(examples)


def test_untrained_tokens_count_only_as_context(random_model):
    examples = random_examples()
    base = score_answers(random_model, examples, 3)
    # Tokens after the last answer are neither targets nor context of one: changing them changes nothing.
    changed = random_examples()
    changed.ids[2][9:] = (changed.ids[2][9:] + 7) % VOCAB
    assert score_answers(random_model, changed, 3)["nll"] == pytest.approx(base["nll"], abs=1e-9)
    # A prompt token trained after all adds exactly its own loss; untrained, it was only context.
    flipped = random_examples()
    flipped.masks[0][3] = True
    prefix_logits = random_model(torch.as_tensor(examples.ids[0][:3], dtype=torch.long)[None]).logits[0, -1]
    own = -torch.log_softmax(prefix_logits.double(), -1)[int(examples.ids[0][3])].item()
    result = score_answers(random_model, flipped, 3)
    assert result["nll"] == pytest.approx(base["nll"] + own, rel=1e-6)
    assert result["answer_tokens"] == base["answer_tokens"] + 1
    # A trained first token has nothing to be predicted from: not counted (as in training).
    assert answers.trained_targets(examples.masks[4]).tolist() == [1, 2, 3, 4]


def test_perplexity_and_bits_per_byte_use_answer_tokens_and_bytes(random_model):
    examples = random_examples()
    result = score_answers(random_model, examples, 4)
    assert result["answer_bytes"] == sum(examples.answer_bytes)
    assert result["bits_per_byte"] == pytest.approx(result["nll"] / math.log(2) / sum(examples.answer_bytes))
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"] / result["answer_tokens"]))
    doubled = random_examples()
    doubled.answer_bytes = [2 * b for b in doubled.answer_bytes]
    assert score_answers(random_model, doubled, 4)["bits_per_byte"] == pytest.approx(result["bits_per_byte"] / 2)


def task_examples(tok, pairs: list[tuple[str, str]], end: int | None = None) -> Examples:
    """prompt + completion + end token (EOS unless given), the completion and the end trained."""
    end = tok.eos_token_id if end is None else end
    ids, masks = [], []
    for prompt, completion in pairs:
        p, c = tok(prompt)["input_ids"], [*tok(completion)["input_ids"], end]
        ids.append(np.array(p + c))
        masks.append(np.array([False] * len(p) + [True] * len(c)))
    n_bytes = [len(c.encode("utf-8")) for _, c in pairs]
    return Examples(ids, masks, [f"qa{i}" for i in range(len(pairs))], n_bytes, len(pairs), sum(map(len, ids)))


PAIRS = [
    ("Question: who wrote Hamlet?\nAnswer:", " William Shakespeare"),
    ("Question: what is the sea?\nAnswer:", " Salt water, mostly."),
    ("Q: Café?\nA:", " Un café, s'il vous plaît."),
]


def test_references_are_the_answers_and_prompts_what_comes_before(tok):
    examples = task_examples(tok, PAIRS)
    asked = answers.questions(examples, tok, answers.end_ids(tok))
    assert [q.reference for q in asked] == [c.strip() for _, c in PAIRS]
    assert [tok.decode(q.prompt_ids) for q in asked] == [p for p, _ in PAIRS]
    assert all(q.reference_ids[-1] == tok.eos_token_id for q in asked)
    assert answers.questions(examples, tok, answers.end_ids(tok), limit=2)[-1].index == 1
    # A template's end-of-turn marker (here a newline, a plain token) is dropped when named.
    newline = tok("\n")["input_ids"][0]
    marked = task_examples(tok, PAIRS, end=newline)
    assert [q.reference for q in answers.questions(marked, tok, answers.end_ids(tok, [newline]))] == [
        c.strip() for _, c in PAIRS
    ]
    # A chat: the last assistant turn is the reference, everything before it the prompt.
    user, first, user2, second = (tok(t)["input_ids"] for t in ("User: hi\n", " Hello.", "\nUser: bye\n", " Farewell."))
    ids = user + first + [tok.eos_token_id] + user2 + second + [tok.eos_token_id]
    mask = [False] * len(user) + [True] * (len(first) + 1) + [False] * len(user2) + [True] * (len(second) + 1)
    chat = Examples([np.array(ids)], [np.array(mask)], ["chat"], [len(" Hello. Farewell.")], 1, len(ids))
    (q,) = answers.questions(chat, tok, answers.end_ids(tok))
    assert q.reference == "Farewell." and q.prompt_ids == ids[: len(ids) - len(second) - 1]


def test_answers_are_seeded_and_independent_of_batching(tok, text_model):
    asked = answers.questions(task_examples(tok, PAIRS), tok, answers.end_ids(tok))
    ends = answers.end_ids(tok)
    cfg = GenerateConfig(preset="balanced", max_new_tokens=6, seed=7, batch_size=3)
    first = answers.generate_answers(text_model, tok, asked, cfg, ends)
    again = answers.generate_answers(
        text_model, tok, asked, GenerateConfig(preset="balanced", max_new_tokens=6, seed=7, batch_size=1), ends
    )
    assert [a.answer for a in first] == [a.answer for a in again]
    assert [a.seed for a in first] == [7, 8, 9]
    other = answers.generate_answers(
        text_model, tok, asked, GenerateConfig(preset="balanced", max_new_tokens=6, seed=70), ends
    )
    assert [a.answer for a in other] != [a.answer for a in first]
    assert all(a.finish == "length" and a.new_tokens == 6 for a in first)  # a random model never ends


def test_answers_stop_at_an_end_token(tok, text_model):
    asked = answers.questions(task_examples(tok, PAIRS[:1]), tok, answers.end_ids(tok))
    cfg = GenerateConfig(preset="greedy", max_new_tokens=5)
    (free,) = answers._generate(text_model, tok, [asked[0].prompt_ids], [0], 5, cfg, answers.end_ids(tok))
    # The greedy answer's third token, made an end token: the answer stops before it.
    (cut,) = answers.generate_answers(text_model, tok, asked, cfg, answers.end_ids(tok, [free[2]]))
    assert cut.finish == "eos" and cut.new_tokens == 2
    assert cut.answer == tok.decode(free[:2]).strip()


@pytest.mark.parametrize(
    "prediction, reference, em, f1",
    [
        ("The Cat!", "cat", 1.0, 1.0),  # case, punctuation and articles do not count
        ("Hello,   world", "hello world", 1.0, 1.0),
        ("a cat sat", "the cat sat down", 0.0, 0.8),  # precision 2/2, recall 2/3
        ("the cat cat", "cat", 0.0, 2 / 3),  # a repeated word overlaps as often as it occurs in both
        ("dog", "cat", 0.0, 0.0),
        ("don't", "dont", 1.0, 1.0),  # punctuation is removed, not turned into spaces
        ("", "", 1.0, 1.0),  # both empty: SQuAD 2.0's rule
        ("the", "nothing", 0.0, 0.0),  # a prediction of only articles normalizes to no words
    ],
)
def test_exact_match_and_f1_as_squad_defines_them(prediction, reference, em, f1):
    result = answers.load_metric("answers").compute(predictions=[prediction], references=[reference])
    assert result["exact_match_each"] == [em] and result["f1_each"] == [pytest.approx(f1)]
    assert result["exact_match"] == 100 * em and result["f1"] == pytest.approx(100 * f1)


def test_match_rates_are_means_over_answers():
    result = answers.load_metric("answers").compute(
        predictions=["a cat sat", "x"], references=["the cat sat down", "x"]
    )
    assert result["answers"] == 2
    assert result["exact_match"] == 50.0 and result["f1"] == pytest.approx(90.0)


def test_run_writes_eval_and_samples(tok, text_model, tmp_path):
    examples = task_examples(tok, PAIRS)
    said = []
    cfg = GenerateConfig(preset="balanced", max_new_tokens=4, seed=3)
    kwargs = dict(out_dir=tmp_path, model_name="tiny", generate_cfg=cfg, say=said.append)
    result = answers.run_answers(text_model, tok, examples, n_samples=2, **kwargs)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == result and len(said) == 2 and "answer perplexity" in said[-1] and "F1" in said[-1]
    assert saved["answers"] == 3 and saved["answer_tokens"] == sum(int(m[1:].sum()) for m in examples.masks)
    assert saved["samples"]["count"] == 2 and saved["samples"]["preset"] == "balanced"
    assert set(saved["samples"]) >= {"exact_match", "f1", "seed", "settings", "max_new_tokens"}
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["William Shakespeare", "Salt water, mostly."]
    assert records[0]["prompt"] == PAIRS[0][0] and records[1]["seed"] == 4
    assert records[0]["settings"] == cfg.settings() and records[0]["max_new_tokens"] == 4
    assert "answer perplexity" in (tmp_path / "eval.md").read_text()
    assert "William Shakespeare" in (tmp_path / "samples.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "samples.jsonl", "samples.md"]
    # The same run again: the same answers.
    answers.run_answers(text_model, tok, examples, n_samples=2, **{**kwargs, "out_dir": tmp_path / "again"})
    assert (tmp_path / "again" / "samples.jsonl").read_text().count('"answer"') == 2
    again = [json.loads(line) for line in (tmp_path / "again" / "samples.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in again] == [r["answer"] for r in records]
    # No samples asked for: scores only.
    plain = answers.run_answers(text_model, tok, examples, n_samples=0, **{**kwargs, "out_dir": tmp_path / "plain"})
    assert "samples" not in plain and not (tmp_path / "plain" / "samples.jsonl").exists()
