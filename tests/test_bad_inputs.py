"""Every bad input, through the command line, in one place: what the user sees (one line naming
the fix, exit code 2, no traceback) and that nothing was half-written (the run directory does
not exist afterwards, or is exactly as it was).

The data layer's own tests (test_data.py) and the other commands' (test_generate.py,
test_evaluation.py) check more variants of some of these; this list is the user's view.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import files_args

from hftextgen.train import rundir

N = "<N>"  # any number in an expected message
ANY = "<ANY>"  # any text (what the operating system says)


@dataclass
class Ctx:
    tmp: Path
    run: Path
    small: object  # conftest.SmallRun
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def finetune(self, *extra: str) -> list[str]:
        return self.small.argv(self.run, *extra)

    def with_data(self, *paths: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return self.finetune("--data.paths", f"[{','.join(map(str, paths))}]", *extra)

    def pretrained(self, name: str, *extra: str) -> list[str]:
        return files_args(self.small.corpus, self.run, *extra, model=["--model.name_or_path", name])

    def copy_run(self) -> Path:
        shutil.copytree(self.small.run_dir, self.run)
        return self.run


def chat_file(c: Ctx, *messages_each: list[dict], name: str = "chat.jsonl") -> Path:
    """A JSON-lines file of conversations, each record's messages the ones given (repeated to 6)."""
    records = [{"messages": messages_each[i % len(messages_each)]} for i in range(6)]
    return c.write(name, "".join(json.dumps(r) + "\n" for r in records))


ASK = {"role": "user", "content": "Who goes there?"}
ANSWER = {"role": "assistant", "content": "Nay, answer me."}


def tasks(c: Ctx, *extra: str) -> list[str]:
    return c.with_data(chat_file(c, [ASK, ANSWER]), extra=extra)


def short_documents(c: Ctx) -> list[str]:
    paths = [c.write(f"short{i}.txt", f"A few words, number {i}.") for i in range(4)]
    return c.with_data(*paths, extra=("--data.block_size", "256"))


def not_a_run(c: Ctx) -> list[str]:
    c.run.mkdir()
    (c.run / "notes.txt").write_text("mine")
    return c.finetune("--train.overwrite_output_dir", "true")


def pairs(c: Ctx, *records: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """DPO from the small run on a file of preference records (each repeated to 6)."""
    path = c.write("pairs.jsonl", "".join(json.dumps(records[i % len(records)]) + "\n" for i in range(6)))
    return c.pretrained(str(c.small.run_dir), "--data.paths", f"[{path}]", *extra)


GOOD_PAIR = {"prompt": "Who goes there?", "chosen": " Nay, answer me.", "rejected": " A friend."}


def other_model(c: Ctx) -> Path:
    """A tiny model with GPT-2's tokenizer (the small run has a BPE of its own)."""
    from conftest import save_tiny_pretrained

    save_tiny_pretrained(c.tmp / "other")
    return c.tmp / "other"


def lora_of_the_small_run(c: Ctx, *extra: str) -> list[str]:
    return c.pretrained(str(c.small.run_dir), "--peft.method", "lora", *extra)


def without_peft(c: Ctx) -> list[str]:
    c.monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` finds when it is not installed
    return lora_of_the_small_run(c)


def an_adapter_folder(c: Ctx) -> list[str]:
    (c.tmp / "adapter").mkdir()
    c.write("adapter/adapter_config.json", '{"base_model_name_or_path": "gpt2"}')
    return c.pretrained(str(c.tmp / "adapter"))


def stopped_before_first_save(c: Ctx) -> list[str]:
    c.run.mkdir()
    for name in ("recipe.yaml", "run_info.json", "data_report.json"):
        (c.run / name).write_text("{}")
    return c.finetune("--train.resume_from_checkpoint", "last")


def damaged_checkpoint(c: Ctx) -> list[str]:
    c.copy_run()
    os.truncate(c.run / "checkpoint-40" / "optimizer.pt", 1000)
    return c.finetune("--train.resume_from_checkpoint", str(c.run / "checkpoint-40"))


def every_checkpoint_damaged(c: Ctx) -> list[str]:
    for checkpoint in rundir.checkpoints(c.copy_run()):
        os.truncate(checkpoint / "trainer_state.json", 10)
    return c.finetune("--train.resume_from_checkpoint", "last")


CASES = {
    # ---- data
    "missing data file": (
        lambda c: c.with_data(c.tmp / "missing.txt"),
        "data.paths: no such file or directory: {tmp}/missing.txt",
    ),
    "empty file": (
        lambda c: c.with_data(c.write("empty.txt", " \n")),
        "data file {tmp}/empty.txt is empty: remove it from data.paths, or fill it",
    ),
    "glob that matches nothing": (
        lambda c: c.with_data(c.tmp / "*.nothing"),
        "data.paths: '{tmp}/*.nothing' matches no .txt/.md/.text/.json/.jsonl/.csv/.parquet files: check the "
        "pattern (** needs a directory part, e.g. data/**/*.txt)",
    ),
    "file that is not UTF-8": (
        lambda c: c.with_data(c.write("latin.txt", "café au lait".encode("latin-1"))),
        "{tmp}/latin.txt is not valid utf-8 (byte 3): set data.encoding to the file's encoding (e.g. latin-1), "
        "or re-save it as UTF-8",
    ),
    "JSONL with a broken line": (
        lambda c: c.with_data(c.write("bad.jsonl", '{"text": "one"}\n{"text": "two"\n')),
        "{tmp}/bad.jsonl:2: not valid JSON (Expecting ',' delimiter): fix or remove that line",
    ),
    "text field that does not exist": (
        lambda c: c.with_data(c.write("rows.jsonl", '{"body": "one", "id": 1}\n'), extra=("--data.format", "text")),
        "{tmp}/rows.jsonl:1 has no field 'text' (fields: body, id): set data.text_field to the one holding the text",
    ),
    "records of no format": (
        lambda c: c.with_data(c.write("rows.jsonl", '{"body": "one", "id": 1}\n')),
        "data.format auto: {tmp}/rows.jsonl:1: the record holds none of the formats (fields found: body, id): "
        "text needs text; prompt_completion needs prompt and completion; messages needs messages (data.text_field "
        "names text's); preference needs chosen and rejected (and a prompt, or two conversations that begin alike)",
    ),
    "every document shorter than one block, and all of them too": (
        short_documents,
        "the train split holds <N> tokens, fewer than one block of data.block_size=256: lower data.block_size, "
        "or give it more text",
    ),
    # ---- preference pairs
    "chosen identical to rejected": (
        lambda c: pairs(c, {"prompt": "Hi", "chosen": " Yes.", "rejected": " Yes."}),
        "{tmp}/pairs.jsonl:1: chosen and rejected are the same answer, so neither can be preferred: drop the record, "
        "or give a different rejected answer",
    ),
    "an empty answer": (
        lambda c: pairs(c, GOOD_PAIR, {"prompt": "Hi", "chosen": " Yes.", "rejected": " "}),
        "{tmp}/pairs.jsonl:2: the rejected answer is empty: fill it in, or drop the record",
    ),
    "a pair without its rejected answer": (
        lambda c: pairs(c, {"prompt": "Hi", "chosen": " Yes."}, extra=("--data.format", "preference")),
        "{tmp}/pairs.jsonl:1 has no 'rejected' field (fields: prompt, chosen): data.format=preference needs chosen "
        "and rejected: set data.format to what the records hold (text, prompt_completion, messages or preference)",
    ),
    "an implicit pair sharing no prefix": (
        lambda c: pairs(
            c,
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}],
                "rejected": [{"role": "user", "content": "Ho"}, {"role": "assistant", "content": "No."}],
            },
        ),
        "{tmp}/pairs.jsonl:1: the record has no prompt field and its chosen and rejected conversations begin with "
        "different messages, so they share no prompt: give the prompt field, or chosen and rejected conversations "
        "that begin with the same turns",
    ),
    "beta 0": (
        lambda c: pairs(c, GOOD_PAIR, extra=("--preference.beta", "0")),
        "preference.beta must be > 0 (got 0.0): it scales the reward, and at 0 or below the objective prefers "
        "nothing or the rejected answer",
    ),
    "a reference with another tokenizer": (
        lambda c: pairs(c, GOOD_PAIR, extra=("--preference.ref_model", str(other_model(c)))),
        "preference.ref_model: {tmp}/other's tokenizer is not the model's (50,257 tokens against <N>, or other ids): "
        "the reference must score the same token ids; use a reference trained with the model's tokenizer",
    ),
    "a preference objective on text": (
        lambda c: c.pretrained(str(c.small.run_dir), "--preference.loss_type", "simpo"),
        "preference.loss_type=simpo trains on pairs of answers, and the data holds text records: give records with "
        "chosen and rejected answers (data.format preference), or drop preference.loss_type",
    ),
    "dpo without a starting model": (
        lambda c: c.with_data(
            c.write("pairs.jsonl", json.dumps(GOOD_PAIR) + "\n"), extra=("--data.format", "preference")
        ),
        "preference.loss_type=dpo (the default) measures the model against a reference, the starting model: set "
        "model.name_or_path (e.g. a supervised run's directory), or use a reference-free objective "
        "(preference.loss_type simpo or orpo)",
    ),
    # ---- the recipe
    "unknown recipe key": (
        lambda c: c.finetune("--train.learnin_rate", "1e-3"),
        "unknown recipe key train.learnin_rate: did you mean train.learning_rate?",
    ),
    "wrong type": (
        lambda c: c.finetune("--data.block_size", "x"),
        "data.block_size: expected int, got 'x'",
    ),
    "block_size larger than n_positions": (
        lambda c: c.finetune("--model.n_positions", "16"),
        "data.block_size (32) is larger than model.n_positions (16): lower data.block_size or raise model.n_positions",
    ),
    "block_size longer than a pretrained model's context": (
        lambda c: c.pretrained(str(c.small.run_dir), "--data.block_size", "64"),
        "data.block_size (64) is longer than the model's context (32 positions): set data.block_size to 32 or less",
    ),
    "vocab smaller than the tokenizer": (
        lambda c: c.finetune("--model.vocab_size", "100"),
        "model.vocab_size (100) is smaller than the tokenizer (<N> tokens): raise it to at least <N>, or leave it "
        "unset",
    ),
    "learning rate 0": (
        lambda c: c.finetune("--train.learning_rate", "0"),
        "train.learning_rate must be > 0 (got 0.0)",
    ),
    "learning rate < 0": (
        lambda c: c.finetune("--train.learning_rate=-1e-3"),
        "train.learning_rate must be > 0 (got -0.001)",
    ),
    "a value that starts with '-' without '='": (
        lambda c: c.finetune("--train.learning_rate", "-1e-3"),
        "--train.learning_rate needs a value (one that starts with '-' goes after '=': --train.learning_rate=-1e-3)",
    ),
    "top_p > 1": (
        lambda c: c.finetune("--generate.top_p", "1.5"),
        "generate.top_p must be in (0, 1] (got 1.5)",
    ),
    "temperature 0": (
        lambda c: c.finetune("--generate.temperature", "0"),
        "generate.temperature must be > 0 (got 0.0)",
    ),
    "top_p > 1 in generate": (
        lambda c: ["generate", "--model", str(c.copy_run()), "--generate.top_p", "1.5"],
        "generate.top_p must be in (0, 1] (got 1.5)",
    ),
    # ---- models
    "model path that is not a model": (
        lambda c: c.pretrained(str(c.small.corpus)),
        "model.name_or_path: {corpus} is not a model (no config.json): point it at a directory written by "
        "save_pretrained, such as a run directory or a checkpoint-N folder inside one, or a hub name",
    ),
    "model path that is not a model, in generate": (
        lambda c: ["generate", "--model", str(c.small.corpus)],
        "--model: {corpus} is not a model (no config.json): point it at a directory written by save_pretrained, "
        "such as a run directory or a checkpoint-N folder inside one, or a hub name",
    ),
    "hub name while offline": (
        lambda c: c.pretrained("gpt2"),
        "model.name_or_path: the tokenizer 'gpt2' is not a local directory and the Hugging Face Hub cannot be "
        "reached (no network, or HF_HUB_OFFLINE=1): save_pretrained it where there is internet and set "
        "model.name_or_path to that directory",
    ),
    "empty prompts file": (
        lambda c: c.finetune("--generate.prompts_file", str(c.write("prompts.txt", "\n  \n"))),
        'generate.prompts_file: {tmp}/prompts.txt holds no prompts: write one per line (or a JSONL "prompt" '
        "field per line), or drop the option",
    ),
    "empty prompts file, in generate": (
        lambda c: ["generate", "--model", str(c.copy_run()), "--generate.prompts_file", str(c.write("p.jsonl", ""))],
        'generate.prompts_file: {tmp}/p.jsonl holds no prompts: write one per line (or a JSONL "prompt" '
        "field per line), or drop the option",
    ),
    # ---- architectures
    "heads that do not divide the width": (
        lambda c: c.finetune("--model.n_embd", "30", "--model.n_head", "4"),
        "model.n_embd (30) must be divisible by model.n_head (4)",
    ),
    "width that the architecture's default heads do not divide": (
        lambda c: c.finetune("--model.model_type", "llama", "--model.n_embd", "100", "--model.n_head", "null"),
        "model.n_embd (100) must be divisible by model.n_head (32, llama's default)",
    ),
    "key/value heads that do not divide the heads": (
        lambda c: c.finetune("--model.model_type", "llama", "--model.n_head", "4", "--model.n_kv_head", "3"),
        "model.n_head (4) must be divisible by model.n_kv_head (3): each key/value head serves the same number of "
        "query heads",
    ),
    "key/value heads in an architecture without them": (
        lambda c: c.finetune("--model.model_type", "gpt2", "--model.n_kv_head", "1"),
        "model.n_kv_head: gpt2 has no key/value head setting (every query head has its own key and value): remove it",
    ),
    "unknown model_type": (
        lambda c: c.finetune("--model.model_type", "lama"),
        "model.model_type: unknown architecture 'lama': did you mean llama?",
    ),
    "model_type that is not a causal language model": (
        lambda c: c.finetune("--model.model_type", "t5"),
        "model.model_type: t5 is not a causal language model (transformers has no AutoModelForCausalLM for it): "
        "pick one that is, e.g. gpt2, llama, qwen3, mistral, gpt_neox",
    ),
    "unknown architecture setting": (
        lambda c: c.finetune("--model.model_type", "llama", "--model.config", "{attention_bais: true}"),
        "model.config: LlamaConfig (llama) has no setting 'attention_bais': did you mean model.config.attention_bias?",
    ),
    "a common shape in model.config": (
        lambda c: c.finetune("--model.model_type", "llama", "--model.config", "{num_hidden_layers: 3}"),
        "model.config.num_hidden_layers is a shape every architecture has: set model.n_layer instead",
    ),
    "a dropout the architecture does not have": (
        lambda c: c.finetune("--model.model_type", "llama", "--model.resid_pdrop", "0.1"),
        "model.resid_pdrop: llama has no dropout on residual branches: remove it (its dropouts: model.attn_pdrop)",
    ),
    "architecture keys with a pretrained model": (
        lambda c: c.pretrained(str(c.small.run_dir), "--model.model_type", "llama"),
        "model.model_type describes a model built from scratch, but model.name_or_path='{small}' loads a "
        "pretrained one: remove one of them",
    ),
    "architecture settings with a pretrained model": (
        lambda c: c.pretrained(str(c.small.run_dir), "--model.config", "{attention_bias: true}"),
        "model.config describes a model built from scratch, but model.name_or_path='{small}' loads a "
        "pretrained one: remove one of them",
    ),
    # ---- LoRA
    "LoRA on a model built from scratch": (
        lambda c: c.finetune("--peft.method", "lora"),
        "peft.method=lora freezes pretrained weights and trains small adapters beside them, but a model built from "
        "scratch has only random weights to freeze: set model.name_or_path to a pretrained model, or drop "
        "peft.method to train every weight",
    ),
    "LoRA rank 0": (
        lambda c: lora_of_the_small_run(c, "--peft.r", "0"),
        "peft.r must be >= 1 (got 0): the rank of each adapter",
    ),
    "LoRA target module not in the model": (
        lambda c: lora_of_the_small_run(c, "--peft.target_modules", "[q_proj, c_attn]"),
        "peft.target_modules: 'q_proj' is not a module of this gpt2 model: its linear layers are c_attn, c_fc, c_proj",
    ),
    "LoRA target module that is not a layer": (
        lambda c: lora_of_the_small_run(c, "--peft.target_modules", "[mlp]"),
        "peft.target_modules: 'mlp' is a GPT2MLP in this gpt2 model, not a layer LoRA can adapt: name linear "
        "layers (c_attn, c_fc, c_proj)",
    ),
    "fine-tuning a LoRA adapter folder": (
        an_adapter_folder,
        "model.name_or_path: {tmp}/adapter holds a LoRA adapter, not a whole model: fine-tune the merged model of "
        "its run (the run directory) instead",
    ),
    "LoRA without the peft package": (
        without_peft,
        "peft.method=lora needs the peft package, which is not installed: pip install peft",
    ),
    # ---- task data
    "a role other than system, user, assistant and tool": (
        lambda c: c.with_data(chat_file(c, [ASK, {"role": "narrator", "content": "x"}, ANSWER])),
        "{tmp}/chat.jsonl:1: messages[1] has role 'narrator': roles are system, user, assistant or tool; map or drop "
        "the others",
    ),
    "a content part that is not text": (
        lambda c: c.with_data(chat_file(c, [{"role": "user", "content": [{"type": "image", "url": "x"}]}, ANSWER])),
        "{tmp}/chat.jsonl:1: messages[0].content holds parts of type image without text: only text parts "
        "(type text, with a text field) can be trained on; drop the others",
    ),
    "no conversation with an answer": (
        lambda c: c.with_data(chat_file(c, [ASK])),
        "the train split holds no examples: <N> conversations had no assistant turn and 0 an answer longer than "
        "data.block_size=32: give conversations that end with an answer, or raise data.block_size",
    ),
    "loss on answers of text": (
        lambda c: c.finetune("--data.loss_on", "answers"),
        "data.loss_on=answers needs prompts and answers, and the data is text: use a prompt_completion or messages "
        "file, or drop data.loss_on",
    ),
    "a format the records do not have": (
        lambda c: c.with_data(chat_file(c, [ASK, ANSWER]), extra=("--data.format", "prompt_completion")),
        "{tmp}/chat.jsonl:1 has no 'prompt' or 'completion' field (fields: messages): data.format=prompt_completion "
        "needs prompt and completion: set data.format to what the records hold (text, prompt_completion, messages "
        "or preference)",
    ),
    "an empty completion": (
        lambda c: c.with_data(c.write("pc.jsonl", '{"prompt": "Who?", "completion": ""}\n' * 4)),
        "{tmp}/pc.jsonl:1: the completion is empty: fill in the answer or drop the record",
    ),
    "a template file that does not exist": (
        lambda c: tasks(c, "--tokenizer.chat_template", str(c.tmp / "missing.jinja")),
        "tokenizer.chat_template: no such file: {tmp}/missing.jinja: give a .jinja file or the template",
    ),
    "a template that does not render": (
        lambda c: tasks(c, "--tokenizer.chat_template", "{% for m in messages %}{{ m.content }}"),
        "the chat template does not render a conversation (TemplateSyntaxError: <ANY>): fix tokenizer.chat_template",
    ),
    "a KV cache with isolated packing": (
        lambda c: tasks(c, "--train.use_cache", "true"),
        "train.use_cache true lets the examples packed into a row see each other (data.packing isolated keeps them "
        "apart only without a KV cache): drop train.use_cache, or set data.packing padded",
    ),
    "a template for text": (
        lambda c: c.finetune("--tokenizer.chat_template", "{{ messages }}"),
        "tokenizer.chat_template renders conversations, and the data holds text records: use data.format messages "
        "(or prompt/completion lists of messages), or drop tokenizer.chat_template",
    ),
    "chat with a model without a template": (
        lambda c: ["generate", "--model", str(c.small.run_dir), "--chat"],
        "--chat: {small} has no chat template, so messages cannot become a prompt: fine-tune it with a task format "
        "(data.format messages or prompt_completion), or set tokenizer.chat_template",
    ),
    # ---- training conveniences
    "early stopping without held-out evaluation": (
        lambda c: c.finetune("--train.early_stopping_patience", "2", "--train.eval_strategy", "no"),
        "train.early_stopping_patience watches held-out evaluations, and train.eval_strategy is no: set it to steps "
        "(or epoch)",
    ),
    "early stopping with checkpoints off the evaluation steps": (
        lambda c: c.finetune("--train.early_stopping_patience", "2", "--train.eval_steps", "4"),
        "train.early_stopping_patience keeps the best checkpoint, which needs a checkpoint at evaluation steps: "
        "make train.save_steps (10) a multiple of train.eval_steps (4)",
    ),
    # ---- the run directory
    "output directory that cannot be created": (
        lambda c: c.finetune("--train.output_dir", "/proc/hftextgen-test/run"),
        "train.output_dir: cannot write to /proc/hftextgen-test/run (<ANY>): choose a directory you can write to",
    ),
    "cache folder that cannot be created": (
        lambda c: ["prepare", *c.finetune("--data.cache_dir", "/proc/hftextgen-test/cache")[1:]],
        "data.cache_dir: cannot write to /proc/hftextgen-test/cache (<ANY>): set data.cache_dir (or $HFTEXTGEN_CACHE) "
        "to a folder you can write",
    ),
    "output directory that is a file": (
        lambda c: c.finetune("--train.output_dir", str(c.write("a-file", "x"))),
        "train.output_dir: {tmp}/a-file is a file: choose a directory",
    ),
    "output directory that holds another run": (
        lambda c: c.copy_run() and c.finetune(),
        "train.output_dir: {run} is not empty (README.md, all_results.json, checkpoint-20, ...): continue "
        "that run with --train.resume_from_checkpoint last, start it over with --train.overwrite_output_dir true, "
        "or choose another --train.output_dir",
    ),
    "overwrite a folder that is not a run": (
        not_a_run,
        "train.overwrite_output_dir: {run} does not look like a run directory (no recipe.yaml, run_info.json, "
        "trainer_state.json or checkpoint-N inside), and only runs are deleted: choose another --train.output_dir",
    ),
    "overwrite with a mistake in the recipe": (
        lambda c: c.copy_run() and c.with_data(c.tmp / "missing.txt", extra=("--train.overwrite_output_dir", "true")),
        "data.paths: no such file or directory: {tmp}/missing.txt",
    ),
    "overwrite and resume at once": (
        lambda c: (
            c.copy_run()
            and c.finetune("--train.overwrite_output_dir", "true", "--train.resume_from_checkpoint", "last")
        ),
        "train.overwrite_output_dir deletes the run that train.resume_from_checkpoint would continue: drop one",
    ),
    "resume a run that stopped before its first checkpoint": (
        stopped_before_first_save,
        "train.resume_from_checkpoint=last: {run} holds no checkpoint-N folder to resume from (the run stopped "
        "before its first save): start it over with --train.overwrite_output_dir true instead",
    ),
    "corrupt checkpoint": (
        damaged_checkpoint,
        "train.resume_from_checkpoint: {run}/checkpoint-40 is incomplete or damaged (optimizer.pt is cut short): "
        "resume from {run}/checkpoint-30 instead",
    ),
    "every checkpoint corrupt": (
        every_checkpoint_damaged,
        "train.resume_from_checkpoint=last: {run} holds no complete checkpoint (checkpoint-40: trainer_state.json "
        "is cut short): start the run over with --train.overwrite_output_dir true instead",
    ),
    "resume with another model": (
        lambda c: c.copy_run() and c.finetune("--train.resume_from_checkpoint", "last", "--model.n_embd", "32"),
        "train.resume_from_checkpoint: {run}/checkpoint-40 holds a model with n_embd=16, but this recipe builds "
        "n_embd=32: resume with the run's own recipe: hftextgen finetune --config {run}/recipe.yaml "
        "--train.resume_from_checkpoint last",
    ),
}


def snapshot(folder: Path) -> dict | None:
    """Every file's size and modification time, or None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, small_run, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))  # the small run's tokenizer and data
    build, message = CASES[case]
    c = Ctx(tmp_path, tmp_path / "run", small_run, monkeypatch)
    argv = build(c)
    before = snapshot(c.run)
    code, _, err = run_cli(*argv)
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("hftextgen: error: ")]
    assert len(errors) == 1, err
    expected = message.format(tmp=tmp_path, run=c.run, corpus=small_run.corpus, small=small_run.run_dir)
    pattern = re.escape(expected).replace(re.escape(N), r"[\d,]+").replace(re.escape(ANY), ".+")
    assert re.fullmatch(pattern, errors[0].removeprefix("hftextgen: error: ")), errors[0]
    assert snapshot(c.run) == before, "the run directory changed"


def test_overwrite_starts_the_run_over(small_run, tmp_path, run_cli, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run.run_dir, run_dir)
    (run_dir / "checkpoint-40" / "marker").write_text("from the earlier run")
    monkeypatch.setenv("HFTEXTGEN_CACHE", str(small_run.cache))
    code, out, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "5"))
    assert code == 2 and "is not empty" in err
    code, out, err = run_cli(*small_run.argv(run_dir, "--train.max_steps", "5", "--train.overwrite_output_dir", "true"))
    assert code == 0, err
    assert f"train.overwrite_output_dir: deleted the earlier run in {run_dir}" in out
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-5"]
    # The saved recipe continues this run as it is, without deleting it again.
    assert "overwrite_output_dir: false" in (run_dir / "recipe.yaml").read_text()


def test_a_token_the_hub_refuses_stops_before_any_work(corpus, tmp_path, run_cli, monkeypatch):
    import huggingface_hub

    from hftextgen import hub

    def refuse(self, token=None):
        response = huggingface_hub.utils.httpx.Response(401, request=huggingface_hub.utils.httpx.Request("GET", "x"))
        raise huggingface_hub.errors.HfHubHTTPError(
            "401 Client Error: Unauthorized for url: https://hf.co/api/whoami", response=response
        )

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refuse)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(*files_args(corpus, run_dir, "--train.push_to_hub", "true"))
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        "hftextgen: error: train.push_to_hub: the Hugging Face Hub does not accept this token (401 Client Error: "
        "Unauthorized for url: https://hf.co/api/whoami): run `hf auth login` with a token that has write access, "
        "or set HF_TOKEN (or train.hub_token)"
    )
    assert "Tokenizing" not in out and not run_dir.exists() and not (tmp_path / "cache").exists()
