"""Where generation stops and how it starts, as the model was trained: a chat template whose turns
end with a token that is not the EOS (ChatML's <|im_end|> on GPT-2's tokenizer, as a Qwen2.5 or
Llama 3 base model has it) stops `generate --chat`, the answers evaluator and stock `pipeline`
there; the recipe's decoding preset is in generation_config.json; a prompt/completion model is
prompted after the BOS its tokenizer adds, as its prompts were trained."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL, TINY_TRAIN, finetune_offline, flags, made_once
from transformers import AutoTokenizer

from hftextgen.data import DEFAULT_CHAT_TEMPLATE, Corpus, DataConfig, end_of_turn_ids, prepare
from hftextgen.generate import GenerateConfig, Generator
from hftextgen.model import (
    PROMPT_CONTEXT,
    ModelConfig,
    build_model,
    bundled_gpt2,
    fingerprint,
    load,
    ready_for_lm,
    set_generation,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER = "Aye, my good lord."
MAX_NEW = 16


def chatml_tokenizer(folder: Path) -> Path:
    """GPT-2's BPE with ChatML's markers added as special tokens and ChatML as its template: the
    EOS (<|endoftext|>) never ends a turn, <|im_end|> does."""
    tok = bundled_gpt2()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def write_chats(path: Path, n: int = 48) -> Path:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Tell me thing {i}."},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory) -> Path:
    """A tiny model trained from scratch on conversations with a ChatML tokenizer (one answer,
    always the same, so that a few steps learn to end it), its answers evaluated at the end."""

    def make(root: Path) -> None:
        tokenizer, data = chatml_tokenizer(root / "tokenizer"), write_chats(root / "chat.jsonl")
        settings = {
            "data.paths": f"[{data}]",
            "data.validation_fraction": 0.1,
            "data.loss_on": "answers",  # said in the recipe: `evaluate` on text must not inherit it
            "tokenizer.source": "pretrained",
            "tokenizer.name_or_path": tokenizer,
            "train.max_steps": 60,
            "train.eval_steps": 60,
            "generate.preset": "greedy",
        }
        argv = ["finetune", *flags(settings), *TINY_MODEL, *TINY_TRAIN, "--data.block_size", "64"]
        finetune_offline(
            argv + flags({"generate.max_new_tokens": MAX_NEW, "train.output_dir": root / "run"}), root / "c"
        )

    return made_once(tmp_path_factory, "chatml", make) / "run"


def test_end_of_turn_ids_of_templates():
    tok = ready_for_lm(bundled_gpt2(), "gpt2")
    assert end_of_turn_ids(tok, DEFAULT_CHAT_TEMPLATE) == [tok.eos_token_id]
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|eot_id|>"]})
    assert end_of_turn_ids(tok, CHATML) == [tok.convert_tokens_to_ids("<|im_end|>")]
    llama3 = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    assert end_of_turn_ids(tok, llama3) == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_the_run_saves_its_end_of_turn_and_decoding_preset(chatml_run):
    saved = json.loads((chatml_run / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(chatml_run)
    assert saved["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert saved["do_sample"] is False and saved["num_beams"] == 1 and "temperature" not in saved
    assert saved[PROMPT_CONTEXT] == "conversation"  # the template begins it: nothing before


def test_chat_stops_at_the_templates_end_of_turn(chatml_run, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me thing 7.\n"))
    out = tmp_path / "chat.jsonl"
    code, said, err = run_cli("generate", "--model", chatml_run, "--chat", "--system", "Be brief.", "--output", out)
    assert code == 0, err
    (answer,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert answer["finish"] == "eos" and answer["new_tokens"] < MAX_NEW
    assert answer["completion"] == ANSWER and ANSWER in said and "<|im_start|>" not in said


def test_the_evaluator_stops_at_the_templates_end_of_turn(chatml_run):
    samples = [json.loads(line) for line in (chatml_run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["finish"] == "eos" and s["new_tokens"] < MAX_NEW for s in samples)
    assert all(s["answer"] == ANSWER == s["reference"] for s in samples)
    assert json.loads((chatml_run / "eval.json").read_text())["samples"]["exact_match"] == 100.0


def test_stock_pipeline_stops_at_the_templates_end_of_turn(chatml_run):
    from transformers import pipeline

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me thing 3."}]
    chat = pipeline("text-generation", model=str(chatml_run), device="cpu")
    (reply,) = chat(messages, max_new_tokens=MAX_NEW)
    assert reply["generated_text"][-1] == {"role": "assistant", "content": ANSWER}
    # Stopped at <|im_end|>, not at max_new_tokens (the run's greedy preset: no sampling asked for).
    lm, tok = chat.model, chat.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = lm.generate(**prompt, max_new_tokens=MAX_NEW)[0, prompt["input_ids"].shape[1] :].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(new) < MAX_NEW


def test_evaluating_a_chat_run_on_plain_text_takes_texts_own_loss(chatml_run, tmp_path, run_cli):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Note {i}: thou art my lord, and the king doth speak." for i in range(12)))
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", chatml_run, "--data.format", "text", "--data.paths", f"[{notes}]"]
    code, _, err = run_cli(*argv, "--data.sample_by", "paragraph", "--evaluate.output_dir", out)
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert result["tokens"] > 0 and result["perplexity"] > 1 and "answers" not in result


def prompt_completion_records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Question {i}: what is it?\n", "completion": " It is so."} for i in range(n)]


def bos_tokenizer(folder: Path):
    """GPT-2's BPE made to add a BOS, as Llama's and Mistral's tokenizers do."""
    tok = bundled_gpt2()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.add_bos_token = True
    tok.save_pretrained(folder)
    return ready_for_lm(AutoTokenizer.from_pretrained(folder), "bos")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_prompt_completion_model_is_prompted_as_its_prompts_were_trained(tmp_path, adds_bos):
    tok = bos_tokenizer(tmp_path / "tok") if adds_bos else ready_for_lm(bundled_gpt2(), "gpt2")
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_completion_records()))
    corpus = Corpus(DataConfig(source="files", paths=[str(data)], block_size=32, max_eval_tokens=1 << 20))
    packed = prepare(corpus, tok, fingerprint(tok))
    lm = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=8), tok, 32)
    set_generation(lm, tok, [], corpus.prompt_context, GenerateConfig().settings())
    gen = Generator(lm, tok, GenerateConfig(max_new_tokens=4))
    items, _, _ = packed.eval_examples("validation")
    for i in range(len(items)):
        ids, trained = items[i].ids.tolist(), items[i].trained
        prompt_ids = ids[: int(trained.argmax())]
        text = tok.decode(prompt_ids, skip_special_tokens=True)
        assert re.fullmatch(r"Question \d+: what is it\?\n", text)
        assert gen._ids(text) == prompt_ids  # the very tokens its prompts were trained with
        assert (prompt_ids[0] == tok.bos_token_id) == adds_bos and prompt_ids[0] != tok.eos_token_id


def test_a_text_model_is_prompted_after_an_eos_as_before(trained_run):
    lm, tok = load(str(trained_run), device="cpu")
    assert Generator(lm, tok, GenerateConfig())._ids("HAMLET:") == [tok.eos_token_id, *tok("HAMLET:")["input_ids"]]
    saved = json.loads((trained_run / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id] and saved[PROMPT_CONTEXT] == "document"
    assert saved["do_sample"] is True and saved["temperature"] == 0.8 and saved["top_k"] == 50


def test_a_pretrained_models_own_sampling_gives_way_to_the_recipes(tmp_path):
    from conftest import save_tiny_pretrained

    base = save_tiny_pretrained(tmp_path / "base", "llama")
    tok = ready_for_lm(bundled_gpt2(), "gpt2")
    base.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, min_p=0.05)
    for preset, sampling in (("greedy", False), ("precise", True)):
        set_generation(base, tok, [7], "document", GenerateConfig(preset=preset).settings())
        base.save_pretrained(tmp_path / preset)  # transformers refuses sampling settings without do_sample
        saved = json.loads((tmp_path / preset / "generation_config.json").read_text())
        assert saved["do_sample"] is sampling and "min_p" not in saved and saved["eos_token_id"] == [50256, 7]
        assert ("temperature" in saved) == sampling and saved.get("top_k", 50) == (0 if sampling else 50)
