"""Preference tuning: pairs read as TRL reads them, encoded exactly as supervised task data, packed
without seeing each other, scored by the same loss as TRL's on the same batch, trained end to end
from a pretrained model (resume, LoRA, bf16), and evaluated before and after."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from conftest import TINY_TRAIN, WORDS, flags, make_text, write_jsonl
from runs import losses, weight_difference
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from hftextgen import evaluate
from hftextgen.data import Corpus, DataConfig, preference, prepare, tasks, templates
from hftextgen.data.pairs import PairCollator, PairItem
from hftextgen.errors import RunStopped, UserError
from hftextgen.model import bundled_gpt2, fingerprint, ready_for_lm
from hftextgen.train import reference
from hftextgen.train.preference_loss import PreferenceLoss

ASK = [{"role": "user", "content": "Who goes there?"}]
YES = [{"role": "assistant", "content": "Nay, answer me."}]
NO = [{"role": "assistant", "content": "A friend to this ground."}]


CHATML = (Path(__file__).parent / "data" / "templates" / "chatml.jinja").read_text()


def trained_bpe(specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few hundred lines of the test corpus."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    lines = make_text(0, lines=120).splitlines()
    bpe.train_from_iterator(lines, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    if specials:
        tokenizer.add_tokens(list(specials), special_tokens=True)
    return tokenizer


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A template without {% generation %} marks, ending turns with a special token of its own."""
    tokenizer = trained_bpe(("<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHATML
    return tokenizer


def prepared(tok, cfg: DataConfig):
    corpus = Corpus(cfg)
    if corpus.uses_template:
        tok.chat_template = templates.DEFAULT_CHAT_TEMPLATE
    return corpus, prepare(corpus, tok, fingerprint(tok))


def files_of(path: Path) -> dict[str, str]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def pair_records(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """Pairs whose chosen answer starts with "yes" and whose rejected one with "no"."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        prompt, chosen, rejected = words(rng.randint(2, 5)), "yes " + words(rng.randint(1, 3)), "no " + words(2)
        if conversational:
            user, say = [{"role": "user", "content": prompt}], lambda t: [{"role": "assistant", "content": t}]
            out.append({"prompt": user, "chosen": say(chosen), "rejected": say(rejected)})
        else:
            out.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return out


# ---------------------------------------------------------------- records


def test_explicit_and_implicit_prompts_split_as_trl_extracts_them():
    from trl.data_utils import extract_prompt

    implicit = {"chosen": ASK + YES, "rejected": ASK + NO}
    assert preference.split_pair(implicit) == (ASK, YES, NO)
    assert extract_prompt(implicit) == {"prompt": ASK, "chosen": YES, "rejected": NO}
    text = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    expected = extract_prompt(text)
    assert preference.split_pair(text) == (expected["prompt"], expected["chosen"], expected["rejected"])
    assert preference.split_pair({"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."}) == (
        "Sky?",
        " Blue.",
        " Red.",
    )
    assert preference.detect_format({"prompt": ASK, "chosen": YES, "rejected": NO}) == "preference"
    assert preference.detect_format({"messages": ASK + YES}) == "messages"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Hi", "chosen": " same", "rejected": " same"}, "chosen and rejected are the same answer"),
        ({"prompt": "Hi", "chosen": "  ", "rejected": " no"}, "the chosen answer is empty"),
        ({"prompt": ASK, "chosen": [], "rejected": NO}, "the chosen answer holds no message"),
        ({"prompt": ASK, "chosen": YES, "rejected": [{"role": "assistant", "content": ""}]}, "empty assistant"),
        ({"prompt": "Hi", "chosen": " yes"}, "needs chosen and rejected (fields found: prompt, chosen)"),
        ({"chosen": ASK + YES, "rejected": NO}, "share no prompt"),
        ({"chosen": "Yes.", "rejected": "No."}, "share no prompt"),
        ({"chosen": ASK + YES, "rejected": ASK + YES + NO}, "the chosen answer holds no message"),
        ({"prompt": ASK, "chosen": " yes", "rejected": NO}, "give prompt, chosen and rejected all as strings"),
        ({"prompt": ASK, "chosen": ASK, "rejected": NO}, "holds no assistant message (roles: user)"),
    ],
)
def test_a_bad_pair_is_one_line_naming_the_record(record, message):
    with pytest.raises(UserError) as caught:
        preference.split_pair(record, 7)
    assert str(caught.value).startswith("record 7: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_pairs_in_a_mixture_are_one_line(tmp_path):
    """Preference pairs train on their own: a mixture holding them is refused before any work."""
    from types import SimpleNamespace

    from hftextgen.data import MixtureSource, open_corpus
    from hftextgen.model import ModelConfig
    from hftextgen.train import PreferenceConfig
    from hftextgen.train import preference as preference_stage

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": " Yes.", "rejected": " No."}] * 4)
    (tmp_path / "notes.txt").write_text(make_text(0, lines=20))
    entries = [MixtureSource(paths=[str(tmp_path / "pairs.jsonl")]), MixtureSource(paths=[str(tmp_path / "notes.txt")])]
    cfg = DataConfig(mixture=entries, block_size=64)
    recipe = SimpleNamespace(preference=PreferenceConfig(), data=cfg, model=ModelConfig(name_or_path="gpt2"))
    with pytest.raises(UserError, match=r"^data\.mixture: preference pairs train on their own"):
        preference_stage.check_data(recipe, open_corpus(cfg))


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_each_side_is_exactly_the_task_encoders_prompt_completion_example(template):
    tok = chatml_tokenizer() if template == "chatml" else trained_bpe()
    if template == "default":
        tok.chat_template = templates.DEFAULT_CHAT_TEMPLATE
    sides = tasks.ExampleEncoder(tok, "prompt_completion")
    record = {"prompt": ASK + YES + ASK, "chosen": YES, "rejected": NO}
    pair = preference.PairEncoder(tok).encode(record)
    parts = preference.parts(pair.input_ids, pair.codes)
    for answer, ids, trained in (
        (YES, parts.chosen, parts.chosen_trained),
        (NO, parts.rejected, parts.rejected_trained),
    ):
        alone = sides.encode({"prompt": record["prompt"], "completion": answer})
        whole = np.concatenate([parts.prompt, ids])
        end = int(np.flatnonzero(alone.trained)[-1]) + 1  # what follows the answer's end token is not kept
        assert whole.tolist() == alone.input_ids[:end].tolist()
        # The answer's trained tokens are the encoder's, and the prompt's own answer is context here.
        assert (
            np.r_[np.zeros(len(parts.prompt), bool), trained].tolist()
            == (alone.trained[:end] & (np.arange(end) >= len(parts.prompt))).tolist()
        )
        assert trained[-1] and tok.decode(ids[trained]).endswith(
            tok.eos_token if template == "default" else "<|im_end|>"
        )


def test_a_long_prompt_is_cut_once_for_both_answers_and_a_long_answer_drops_the_pair():
    tok = ready_for_lm(bundled_gpt2(), "gpt2")
    encoder = preference.PairEncoder(tok, max_length=24)
    counts = tasks.Counts()
    long_prompt = " ".join(["thou art my lord"] * 8)
    pair = encoder.encode({"prompt": long_prompt, "chosen": " yes my lord, so be it", "rejected": " no"}, 0, counts)
    parts = preference.parts(pair.input_ids, pair.codes)
    assert pair.truncated and len(parts.prompt) + len(parts.chosen) == 24  # the longer answer decides the cut
    assert len(parts.prompt) + len(parts.rejected) < 24
    assert encoder.encode({"prompt": "Hi", "chosen": " yes" * 40, "rejected": " no"}, 1, counts) is None
    assert (counts.examples, counts.truncated, counts.dropped_too_long) == (1, 1, 1)


@pytest.mark.slow  # worker processes
def test_prepared_pairs_are_the_same_bytes_whatever_the_number_of_processes(tmp_path):
    tok = ready_for_lm(bundled_gpt2(), "gpt2")
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_records(300, conversational=True))
    entries = []
    for procs in (1, 2):
        cfg = DataConfig(paths=[str(path)], block_size=64, num_proc=procs, cache_dir=str(tmp_path / f"c{procs}"))
        corpus, packed = prepared(tok, cfg)
        assert corpus.format == "preference" and packed.report["train"]["examples"]["examples"] > 250
        entries.append(files_of(packed.cache_path))
    assert entries[0] == entries[1]


# ---------------------------------------------------------------- batches and the loss


def tiny_lm(model_type: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = {"gpt2": dict(n_layer=2, n_head=2, n_embd=16, n_positions=64)}.get(
        model_type,
        dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=16, intermediate_size=32),
    )
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def random_items(n: int, vocab: int, seed: int = 0, reference=None) -> list[PairItem]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        prompt, chosen, rejected = (rng.integers(3, vocab, rng.integers(a, b)) for a, b in ((2, 9), (2, 7), (1, 6)))
        chosen_trained = np.ones(len(chosen), bool)
        chosen_trained[0] = i % 2 == 0  # a context token inside an answer is never scored
        ref = None if reference is None else reference[i]
        items.append(PairItem(i, prompt, chosen, chosen_trained, rejected, np.ones(len(rejected), bool), ref))
    return items


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_sequences_score_as_each_one_alone(model_type):
    lm, items = tiny_lm(model_type, 300), random_items(6, 300)
    packed = evaluate.score_pairs(lm, items, PairCollator(0, 24), batch_size=6)
    alone = evaluate.score_pairs(lm, items, PairCollator(0, 24), batch_size=1)
    batch = PairCollator(0, 24)(items)
    assert len(batch["input_ids"]) < 12  # several sequences a row
    with torch.no_grad():
        for i, item in enumerate(items):
            for column, (answer, trained) in enumerate(
                ((item.chosen, item.chosen_trained), (item.rejected, item.rejected_trained))
            ):
                ids = torch.tensor(np.concatenate([item.prompt, answer]))[None]
                logp = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
                scored = np.r_[np.zeros(len(item.prompt), bool), trained][1:]
                assert abs(float(logp[torch.from_numpy(scored)].sum()) - packed[i, column]) < 1e-4
    np.testing.assert_allclose(packed, alone, atol=1e-5)


def trl_batches(items, pad: int) -> tuple[dict, dict]:
    """The same pairs as TRL batches them: DPOTrainer's collator, and the experimental trainers' padded
    chosen_*/rejected_* tensors (labels only on the answers)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dpo = DataCollatorForPreference(pad_token_id=pad)(
        [{"prompt_ids": list(i.prompt), "chosen_ids": list(i.chosen), "rejected_ids": list(i.rejected)} for i in items]
    )
    padded = {}
    for side in ("chosen", "rejected"):
        seqs = [np.concatenate([i.prompt, getattr(i, side)]) for i in items]
        width = max(map(len, seqs))
        ids, mask, labels = (
            torch.full((len(seqs), width), pad),
            torch.zeros(len(seqs), width, dtype=torch.long),
            torch.full((len(seqs), width), -100),
        )
        for row, (item, seq) in enumerate(zip(items, seqs, strict=True)):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.from_numpy(seq), 1
            labels[row, len(item.prompt) : len(seq)] = torch.from_numpy(getattr(item, side))
        padded |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return dpo, padded


def ours(lm, items, objective: str, beta: float, gamma: float = 0.0) -> tuple[float, dict]:
    batch = PairCollator(0, 32, prompt_targets=objective == "orpo")(items)
    labels, loss = batch.pop("labels"), PreferenceLoss(objective, beta, gamma)
    value = loss(lm(**batch, use_cache=False), labels).item()
    return value, loss.take("train" if torch.is_grad_enabled() else "eval")


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory):
    """A tiny Llama-style model as TRL's trainers load one, a reference, and pairs every answer
    token of which is trained (TRL's completions are)."""
    tok = trained_bpe()
    tok.pad_token = tok.eos_token
    ref = tiny_lm("llama", len(tok))
    lm = copy.deepcopy(ref)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [i._replace(chosen_trained=np.ones(len(i.chosen), bool)) for i in random_items(6, len(tok), seed=1)]
    scores = evaluate.score_pairs(ref, items, PairCollator(0, 32), batch_size=4)
    items = [item._replace(reference=scores[k, :2]) for k, item in enumerate(items)]
    return lm, ref, tok, items, tmp_path_factory.mktemp("trl")


@pytest.mark.parametrize("objective, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trls_dpo_trainer_on_the_same_batch(policy_and_reference, objective, trl_loss):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    lm, ref, tok, items, tmp = policy_and_reference
    args = DPOConfig(output_dir=str(tmp), loss_type=[trl_loss], beta=0.2, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_dict({"prompt": ["a"] * 2, "chosen": [" b"] * 2, "rejected": [" c"] * 2})
    trainer = DPOTrainer(model=lm, ref_model=ref, args=args, train_dataset=dataset, processing_class=tok)
    dpo_batch, _ = trl_batches(items, tok.pad_token_id)
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model.eval(), dpo_batch).item()
        got, logged = ours(lm, items, objective, 0.2)
    assert abs(got - expected) < 1e-5 * max(1.0, abs(expected))
    theirs = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert abs(logged[name] - theirs[name]) < 1e-4, name


def test_simpo_and_orpo_equal_trls_cpo_and_orpo_trainers_on_the_same_batch(policy_and_reference):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lm, _, tok, items, tmp = policy_and_reference
    dataset = Dataset.from_dict({"prompt": ["a"] * 2, "chosen": [" b"] * 2, "rejected": [" c"] * 2})
    _, padded = trl_batches(items, tok.pad_token_id)
    common = dict(output_dir=str(tmp), report_to=[], use_cpu=True, bf16=False, max_length=64)
    simpo = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)
    for trl_trainer, args, objective, beta, gamma in (
        (CPOTrainer, simpo, "simpo", 2.0, 1.0),
        (ORPOTrainer, ORPOConfig(beta=0.1, **common), "orpo", 0.1, 0.0),
    ):
        trainer = trl_trainer(model=lm, args=args, train_dataset=dataset, processing_class=tok)
        with torch.no_grad():
            expected, theirs = trainer.get_batch_loss_metrics(trainer.model.eval(), padded, "train")
            got, logged = ours(lm, items, objective, beta, gamma)
        assert abs(got - expected.item()) < 1e-5 * max(1.0, abs(expected.item())), objective
        for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"):
            assert abs(logged[name] - theirs[name]) < 1e-4, (objective, name)
        if objective == "orpo":
            assert abs(logged["nll_loss"] - theirs["nll_loss"]) < 1e-4


def test_the_reference_is_computed_once_and_a_stopped_computation_continues(tmp_path, monkeypatch):
    lm = tiny_lm("gpt2", 300)
    items = random_items(20, 300)

    class Pairs(list):
        indices = np.arange(20)

        def select(self, chosen):
            picked = Pairs(self[int(i)] for i in chosen)
            picked.indices = self.indices[np.asarray(chosen, np.int64)]
            return picked

    pairs, collator, calls = Pairs(items), PairCollator(0, 24), []

    def interrupted(batch_items):
        calls.append(len(batch_items))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the second batch
        return collator(batch_items)

    monkeypatch.setattr(reference, "CHUNK_PAIRS", 8)
    with pytest.raises(RunStopped) as stopped:
        reference.fill(tmp_path, "train", pairs, lambda: lm, interrupted, 4, False, 20, {})
    assert "8 of 20 train pairs are done and kept: the same command continues" in str(stopped.value)
    calls.clear()

    def counting(batch_items):
        calls.append(len(batch_items))
        return collator(batch_items)

    got = reference.fill(tmp_path, "train", pairs, lambda: lm, counting, 4, False, 20, {})
    assert sum(calls) == 12  # the 12 pairs the stopped run did not do
    expected = evaluate.score_pairs(lm, items, collator, 4)[:, :2]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (
        reference.fill(tmp_path, "train", pairs, lambda: pytest.fail("loaded again"), collator, 4, False, 20, {})
        is not None
    )


# ---------------------------------------------------------------- runs


def preference_args(run_dir: Path, data: Path, base: Path, *extra: str) -> list[str]:
    settings = flags(
        {
            "model.name_or_path": base,
            "data.paths": f"[{data}]",
            "data.validation_fraction": 0.2,
            "train.max_steps": 6,
            "train.save_steps": 3,
            "train.eval_steps": 3,
            "evaluate.max_answers": 2,
        }
    )
    return ["finetune", *settings, *TINY_TRAIN, "--train.output_dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records(60))


@pytest.mark.slow
def test_a_dpo_run_trains_logs_trls_metrics_and_evaluates_before_and_after(
    small_run, pairs_file, tmp_path, run_cli, monkeypatch
):
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(*preference_args(run_dir, pairs_file, small_run.run_dir))
    assert code == 0, err
    assert "data.format auto: " in out + err and "reading preference records" in out + err
    assert "batch: 4 pairs = 4 per device" in out
    state = json.loads((run_dir / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 6 and all("rewards/margins" in e and "rewards/accuracies" in e for e in logged)
    assert any("eval_rewards/chosen" in e for e in state["log_history"])
    scores = json.loads((run_dir / "eval.json").read_text())
    assert scores["objective"] == "dpo" and scores["pairs"] == 12
    assert set(scores["before"]) >= {"accuracy", "chosen_bits_per_byte", "rejected_bits_per_byte"}
    assert scores["before"]["reward_margin"] == 0.0 and scores["after"]["reward_accuracy"] is not None
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2
    assert "## Results" in (run_dir / "README.md").read_text()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["reference"]["model"] == str(small_run.run_dir)

    # The same data and model: the reference's log-probabilities come from the cache.
    again = tmp_path / "again"
    code, out, err = run_cli(*preference_args(again, pairs_file, small_run.run_dir, "--train.max_steps", "2"))
    assert code == 0 and "Reference log-probabilities" not in err + out
    # `evaluate` finds them too, for the "before".
    code, out, err = run_cli("evaluate", "--model", str(run_dir), "--evaluate.output_dir", str(tmp_path / "ev"))
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["before"] == scores["before"]


def _final_files(folder: Path, run_dir: Path, names: list[str]) -> list[str]:
    """What a run writes after its checkpoint at step 3: the last checkpoint, the final model and metrics."""
    if folder != run_dir:
        return []
    return [n for n in names if n == "checkpoint-6" or n.endswith(("_results.json", ".safetensors"))]


@pytest.mark.slow
def test_a_stopped_preference_run_resumes_to_the_same_weights(small_run, pairs_file, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    base = ("--evaluate.at_end_of_training", "false")
    assert run_cli(*preference_args(whole, pairs_file, small_run.run_dir, *base))[0] == 0
    # What a run killed after its checkpoint at step 3 leaves.
    shutil.copytree(whole, resumed, ignore=lambda folder, names: _final_files(Path(folder), whole, names))
    code, _, err = run_cli(
        *preference_args(resumed, pairs_file, small_run.run_dir, *base, "--train.resume_from_checkpoint", "last")
    )
    assert code == 0, err
    assert losses(resumed) == losses(whole)
    assert weight_difference(whole, resumed) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_train_with_lora_in_bf16(
    small_run, pairs_file, tmp_path, run_cli, monkeypatch, objective
):
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))
    run_dir = tmp_path / "run"
    extra = ("--preference.loss_type", objective, "--peft.method", "lora", "--peft.r", "4", "--train.bf16", "true")
    code, out, err = run_cli(*preference_args(run_dir, pairs_file, small_run.run_dir, *extra))
    assert code == 0, err
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    scores = json.loads((run_dir / "eval.json").read_text())
    assert scores["objective"] == objective and scores["before"]["reward_accuracy"] is not None
    logged = [e for e in json.loads((run_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all(("nll_loss" in e) == (objective == "orpo") for e in logged)


@pytest.mark.slow
def test_with_lora_the_reference_is_the_base_model(small_run, pairs_file, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))
    infos = []
    for name, extra in (("full", ()), ("lora", ("--peft.method", "lora"))):
        code, _, err = run_cli(
            *preference_args(
                tmp_path / name,
                pairs_file,
                small_run.run_dir,
                "--train.max_steps",
                "1",
                "--evaluate.at_end_of_training",
                "false",
                *extra,
            )
        )
        assert code == 0, err
        infos.append(json.loads((tmp_path / name / "run_info.json").read_text())["reference"])
    assert infos[0] == infos[1]  # one cache entry: the same reference weights


@pytest.mark.slow
def test_two_processes_train_a_dpo_run_like_one_with_the_same_global_batch(small_run, pairs_file, tmp_path, run_cli):
    from runs import launch_two

    common = ("--evaluate.at_end_of_training", "false", "--train.max_steps", "4")
    two = tmp_path / "two"
    result = launch_two(
        preference_args(two, pairs_file, small_run.run_dir, *common, "--train.per_device_train_batch_size", "2"),
        tmp_path / "cache",
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert output.count("batch: 4 pairs = 2 per device x 2 processes") == 1, output
    assert output.count("Reference log-probabilities (train") == 1  # the first process computed them
    one = tmp_path / "one"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HFTEXTGEN_CACHE", str(tmp_path / "cache"))
        code, _, err = run_cli(*preference_args(one, pairs_file, small_run.run_dir, *common))
    assert code == 0, err
    got, expected = losses(two), losses(one)
    assert list(got) == list(expected) == [1, 2, 3, 4]
    # Float summation order only (a mean of 4 pairs against the mean of two means of 2): measured
    # 6e-8 on the losses and 3e-4 on the weights (AdamW's first steps, near sign(gradient), make
    # much of tiny gradient differences). Another data order moves them by 5e-2 and 5e-2, a 10%
    # higher learning rate by 1e-2 and 2e-2.
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-4, (got, expected)
    assert weight_difference(one, two) < 2e-3
    # The rewards are averaged across the processes: each logged once, over all 4 pairs.
    margins = [
        e["rewards/margins"] for e in json.loads((two / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    expected_margins = [
        e["rewards/margins"] for e in json.loads((one / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert np.allclose(margins, expected_margins, atol=1e-4)
