"""The generation evaluator: exact strided NLL, the metric modules, and `hftextgen evaluate`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import files_args, flags
from oracle import document_ids, evaluate_texts
from transformers import AutoModelForCausalLM, GPT2Config

from hftextgen.evaluate import EvaluateConfig
from hftextgen.evaluate import run as evaluation
from hftextgen.evaluate.run import load_metric, score, windows
from hftextgen.model.tokenizer import bundled_gpt2, ready_for_lm

CONTEXT = 16
# A short run in bf16 on any CPU (autocast emulates it where the CPU lacks it), on a BPE of 300
# tokens, with the evaluation at its end.
BF16_RUN = {
    "train.bf16": "true",
    "train.max_steps": 6,
    "train.eval_steps": 6,
    "tokenizer.source": "train",
    "tokenizer.vocab_size": 300,
    "evaluate.stride": 8,
}


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=CONTEXT, vocab_size=300)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def brute_force(lm, ids: list[int], context_of) -> tuple[float, int]:
    """Score token j alone, from the tokens context_of(j) says it may see: no windows, no batches."""
    total = 0.0
    for j in range(1, len(ids)):
        prefix = torch.tensor([ids[context_of(j) : j]])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm(prefix).logits[0, -1].double(), -1)
        total -= logprobs[ids[j]].item()
    return total, len(ids) - 1


def test_windows_score_every_token_once_with_enough_context():
    for length in (1, 2, 5, 16, 17, 18, 40, 97):
        for stride in (1, 3, 8, 15, 16):
            scored = []
            for begin, first, stop in windows(length, CONTEXT, stride):
                assert stop - 1 - begin <= CONTEXT  # the inputs fit the model
                assert first - begin >= min(first, CONTEXT - stride + 1)  # context of the first target
                scored += range(first, stop)
            assert scored == list(range(1, length)), (length, stride)
    # The last window of a document reaches back to a full context.
    assert windows(40, CONTEXT, CONTEXT)[-1] == (40 - 1 - CONTEXT, 33, 40)


@pytest.mark.parametrize(
    "stride, context_of, lengths",
    [
        # every token sees the CONTEXT tokens before it
        (1, lambda j: max(0, j - CONTEXT), (57, 3, CONTEXT, CONTEXT + 1, 40, 0)),
        # disjoint windows of CONTEXT targets each (lengths that are whole windows: a last partial
        # window is moved back to see a full context, as test_windows_* checks)
        (CONTEXT, lambda j: j - 1 - (j - 1) % CONTEXT, (3 * CONTEXT, 3, CONTEXT, 2 * CONTEXT, 0)),
    ],
    ids=["stride-1", "disjoint"],
)
def test_strided_nll_equals_a_token_by_token_reference(random_model, stride, context_of, lengths):
    rng = torch.Generator().manual_seed(1)
    docs = [[0, *torch.randint(1, 300, (n,), generator=rng).tolist()] for n in lengths]
    got = score(random_model, docs, CONTEXT, stride, batch_size=4)
    for doc, (nll, tokens) in zip(docs, got, strict=True):
        ref_nll, ref_tokens = brute_force(random_model, doc, context_of)
        assert tokens == ref_tokens
        if tokens:
            assert nll / tokens == pytest.approx(ref_nll / tokens, abs=1e-5)


def test_short_documents_are_scored_with_their_whole_prefix(random_model):
    doc = [0, *range(5, 5 + CONTEXT)]  # exactly one window
    ((nll, tokens),) = score(random_model, [doc], CONTEXT, 4, batch_size=1)
    ref, _ = brute_force(random_model, doc, lambda j: 0)
    assert tokens == CONTEXT and nll == pytest.approx(ref, abs=1e-5 * CONTEXT)


def test_batching_does_not_change_the_result(random_model):
    docs = [[0, *range(10, 10 + n)] for n in (50, 7, 33, 20)]
    one = score(random_model, docs, CONTEXT, 5, batch_size=1)
    many = score(random_model, docs, CONTEXT, 5, batch_size=16)
    for (a, n), (b, m) in zip(one, many, strict=True):
        assert n == m and a == pytest.approx(b, abs=1e-5 * n)


def test_perplexity_metric_is_token_weighted():
    metric = load_metric("perplexity")
    result = metric.compute(nll=[10.0, 2.0], tokens=[8, 2], bytes=[5, 2], words=[2, 1])
    assert result["tokens"] == 10 and result["bytes"] == 5 + 2 and result["words"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(12 / 10))  # not the mean of exp(10/8), exp(2/2)
    assert result["bits_per_byte"] == pytest.approx(12 / math.log(2) / 7)
    assert result["word_perplexity"] == pytest.approx(math.exp(12 / 3))


def test_diversity_metric():
    result = load_metric("diversity").compute(predictions=["a b c d a b c d", "x y"])
    assert result["distinct_1"] == pytest.approx(6 / 10)
    assert result["distinct_2"] == pytest.approx(5 / 8)  # ab bc cd da ab bc cd + xy
    # 4-grams of the first text: abcd bcda cdab dabc abcd: the last one repeats the first.
    assert result["repeated_4grams"] == pytest.approx(1 / 5)


def test_document_ids_start_after_eos_and_end_with_it():
    tok = ready_for_lm(bundled_gpt2(), "gpt2")
    (with_eos,) = document_ids(["Hello world"], tok, add_eos=True)
    assert with_eos == [50256, 15496, 995, 50256]
    assert document_ids(["Hello world"], tok, add_eos=False) == [[50256, 15496, 995]]


def test_finetune_and_standalone_evaluate_agree(trained_run, tmp_path, run_cli):
    at_end = json.loads((trained_run / "eval.json").read_text())
    code, out, err = run_cli("evaluate", "--model", trained_run, "--evaluate.output_dir", tmp_path / "again")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["documents"] == at_end["documents"] == 2 and again["tokens"] == at_end["tokens"]
    for key in ("perplexity", "bits_per_byte", "word_perplexity"):
        assert again[key] == pytest.approx(at_end[key], rel=1e-4), key
    assert again["stride"] == 8  # taken from the run's recipe
    samples = [json.loads(line) for line in (tmp_path / "again" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["HAMLET:", ""]
    assert "perplexity" in (tmp_path / "again" / "eval.md").read_text()
    # The diversity reported is that of the samples written beside it.
    diversity = evaluation.diversity_metrics([s["completion"] for s in samples])
    for key in ("distinct_1", "distinct_2", "distinct_3", "repeated_4grams"):
        assert again["samples"][key] == diversity[key], key


def test_eval_mode_runs_the_models_own_forward_and_gives_the_training_wrapper_back(random_model):
    """accelerate's bf16 preparation wraps the instance's forward in autocast: eval_mode runs the
    model's own forward inside the block, and training goes on in bf16 after it (samples taken
    during training must not switch the rest of the run to fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hftextgen.runtime import eval_mode

    model = AutoModelForCausalLM.from_config(random_model.config, attn_implementation="sdpa")
    model.load_state_dict(random_model.state_dict())
    AcceleratorState._reset_state(reset_partial_state=True)  # another test's Trainer may have set it
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    ids = torch.arange(CONTEXT).unsqueeze(0) * 7 % 300
    wrapped = model.forward
    with torch.no_grad():
        with eval_mode(model):
            own = model(input_ids=ids).logits
        assert model.forward is wrapped and model.training
        with eval_mode(random_model):
            reference = random_model(input_ids=ids).logits
        in_bf16 = model(input_ids=ids).logits
    assert torch.equal(own, reference)
    assert not torch.equal(in_bf16, reference)


@pytest.mark.slow
def test_end_of_training_evaluation_scores_the_saved_model(corpus, tmp_path, run_cli):
    """Trained with bf16 autocast, which accelerate puts around the model's forward and leaves
    there after training: the evaluation at the end still scores (and samples) the model as
    `hftextgen evaluate` loads it from the run directory, to the last digit."""
    run = tmp_path / "run"
    trained = files_args(corpus, run, *flags(BF16_RUN))
    code, _, err = run_cli(*trained)
    assert code == 0, err
    code, _, err = run_cli("evaluate", "--model", run, "--evaluate.output_dir", tmp_path / "again")
    assert code == 0, err
    at_end, again = (json.loads((folder / "eval.json").read_text()) for folder in (run, tmp_path / "again"))
    assert at_end["precision"] == "fp32" and at_end["tokens"] > 0
    for key in ("seconds", "tokens_per_second", "evaluated"):
        at_end.pop(key), again.pop(key)
    assert at_end == again
    samples = [(folder / "samples.jsonl").read_text() for folder in (run, tmp_path / "again")]
    assert samples[0] == samples[1]


def test_smaller_stride_never_scores_worse_on_a_trained_model(trained_run):
    from hftextgen.model.build import load

    lm, tok = load(str(trained_run), device="cpu")
    texts = [(p.parent / p.name).read_text() for p in sorted((trained_run.parent / "corpus").glob("*.txt"))[:3]]
    disjoint = evaluate_texts(lm, tok, texts, EvaluateConfig(stride=32), add_eos=True)
    strided = evaluate_texts(lm, tok, texts, EvaluateConfig(stride=4), add_eos=True)
    assert strided["tokens"] == disjoint["tokens"]
    assert strided["perplexity"] <= disjoint["perplexity"]
    assert strided["bits_per_byte"] <= disjoint["bits_per_byte"]


def test_evaluate_errors_are_one_line(trained_run, tmp_path, run_cli):
    cases = {
        ("--evaluate.stride", "64"): "evaluate.stride (64) must be <= the context (32)",
        ("--evaluate.context", "100"): "longer than the model's context (32)",
        ("--evaluate.stride", "0"): "evaluate.stride must be >= 1",
    }
    for extra, message in cases.items():
        code, _, err = run_cli("evaluate", "--model", trained_run, "--evaluate.output_dir", tmp_path / "x", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("evaluate", "--model", tmp_path)
    assert code == 2 and "is not a model (no config.json)" in err


@pytest.mark.slow
def test_evaluate_split_all_scores_a_file_that_is_one_document(trained_run, tmp_path, run_cli):
    """Nothing is held out with split all, so one document is enough (a hold-out would refuse it)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("HAMLET:\nTo be, or not to be, that is the question.\n")
    argv = ["evaluate", "--model", trained_run, "--data.source", "files", "--data.paths", f"[{notes}]"]
    code, out, err = run_cli(*argv, "--evaluate.split", "all", "--evaluate.output_dir", tmp_path / "eval")
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["documents"] == 1 and result["data"] == f"files, 1 document ({notes})"
    assert result["tokens"] == len(bundled_gpt2()(notes.read_text())["input_ids"]) + 1
    code, _, err = run_cli(*argv, "--evaluate.split", "validation", "--evaluate.output_dir", tmp_path / "v")
    assert code == 2 and "too few to hold out whole documents" in err

    # A document longer than data.max_eval_tokens: its first max_eval_tokens tokens are scored,
    # and bits-per-byte divides by their bytes, not the document's.
    code, out, err = run_cli(
        *argv, "--evaluate.split", "all", "--data.max_eval_tokens", "5", "--evaluate.output_dir", tmp_path / "cut"
    )
    assert code == 0, err
    cut = json.loads((tmp_path / "cut" / "eval.json").read_text())
    whole = result["tokens"]
    assert cut["tokens"] == 5 and cut["documents"] == 1
    assert cut["data"] == (
        f"files, the first 5 tokens of one document longer than data.max_eval_tokens=5 (the split: 1 document, "
        f"{whole} tokens) ({notes})"
    )
    first = bundled_gpt2().decode(bundled_gpt2()(notes.read_text())["input_ids"][:5])
    assert cut["bytes"] == len(first.encode()) and cut["words"] == len(first.split())


def test_losses_in_chunks_of_rows_are_each_rows_cross_entropy(monkeypatch):
    """The evaluator turns logits into losses a chunk of rows at a time (memory): the same
    numbers as one call over the whole batch, whatever the chunking, last chunk short."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 11, generator=generator)
    targets = torch.randint(0, 11, (23,), generator=generator)
    whole = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    monkeypatch.setattr(evaluation, "LOSS_CHUNK_ELEMENTS", 5 * 11)  # 5 rows a chunk: 5 x 4 + 3
    assert torch.equal(evaluation.nll_rows(logits, targets), whole)
    monkeypatch.setattr(evaluation, "LOSS_CHUNK_ELEMENTS", 1)
    assert torch.equal(evaluation.nll_rows(logits, targets), whole)
