"""The fast paths compute what the slow ones do: the fast training settings against plain ones
(tests/test_fused_loss.py: the fused loss against each model's own), the fast tokenizing and
packing against a run_clm-style datasets.map. No timings here: bench/ measures speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import files_args, flags, write_corpus
from oracle import blocks_array, run_clm_blocks, split_texts

from hftextgen import data
from hftextgen.data import DataConfig, encoders, shards
from hftextgen.model import tokenizer

VOCAB = 50257

# ---------------------------------------------------------------- fast settings train like plain ones


def logged_losses(run_dir) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


NO_DROPOUT = flags({"model.resid_pdrop": 0, "model.embd_pdrop": 0, "model.attn_pdrop": 0})
PLAIN = flags({"train.bf16": "false", "train.optim": "adamw_torch", "train.fused_loss": "false"})


@pytest.mark.slow
def test_fast_settings_train_like_plain_settings(corpus, tmp_path, run_cli):
    """15 optimizer steps of the same model on the same batches, dropout off.

    fused loss alone (fp32): the loss curve is the stock one to float rounding, 1e-4.
    bf16 autocast + fused AdamW + fused loss, the fast settings: bf16 moves each step's loss by
    well under 1%; 3% allows for the steps' drift.
    """
    settings = {
        "plain": PLAIN,
        "fused loss": flags({"train.bf16": "false", "train.optim": "adamw_torch", "train.fused_loss": "true"}),
        "fast": flags({"train.bf16": "true", "train.optim": "adamw_torch_fused", "train.fused_loss": "true"}),
    }
    curves = {}
    for name, setting in settings.items():
        run_dir = tmp_path / name.replace(" ", "-")
        code, _, err = run_cli(*files_args(corpus, run_dir, *NO_DROPOUT, *setting, "--train.max_steps", "15"))
        assert code == 0, err
        curves[name] = logged_losses(run_dir)
    assert len(curves["plain"]) == 15
    assert curves["fused loss"] == pytest.approx(curves["plain"], abs=1e-4)
    assert curves["fast"] == pytest.approx(curves["plain"], rel=0.03)
    assert curves["fast"][-1] < curves["fast"][0] - 1.0  # and it learns


# ---------------------------------------------------------------- tokenizing and packing


def gpt2():
    return tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")


def encoded(tok, texts: list[str], threads: int = 1) -> tuple[str, list[list[int]]]:
    """(route, ids of texts) of the encoder preparing builds for `tok`."""
    spec = tokenizer.encoder_spec(tok)
    return spec["route"], [ids.tolist() for ids in encoders.build_encoder(spec, threads)(texts)]


def test_the_encoder_is_the_tokenizer_on_gpt2_by_tiktoken():
    tok = gpt2()
    texts = [*tokenizer.PROBES, "KING:\nGood night, sweet prince.\n\n", ""]
    for threads in (1, 2):
        route, ids = encoded(tok, texts, threads)
        assert route == "tiktoken"  # the fast route, not a silent fallback
        assert ids == tok(texts, add_special_tokens=False)["input_ids"]


def test_the_encoder_of_a_trained_tokenizer_is_the_rust_backend(tmp_path):
    texts = [f"word{i % 50} and more words, {i}\n" * 3 for i in range(200)]
    tok = tokenizer.train_bpe(texts, vocab_size=400, min_frequency=2)
    tok = tokenizer.ready_for_lm(tok, "trained")
    probe = [*tokenizer.PROBES, *texts[:5]]
    route, ids = encoded(tok, probe)
    assert route == "backend"
    assert ids == tok(probe, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("add_eos", [True, False])
@pytest.mark.parametrize("num_proc", [None, 2], ids=["in-process", "datasets-map"])
def test_prepare_matches_the_run_clm_reference(tmp_path, add_eos, num_proc):
    folder = write_corpus(tmp_path / "corpus", n_docs=12, lines=40)
    (folder / "odd.txt").write_text("Ünïcödé 😀 <|endoftext|> inside a document,\r\n\ttabs   and  spaces\n")
    cfg = DataConfig(
        source="files", paths=[str(folder)], block_size=24, add_eos=add_eos, num_proc=num_proc, validation_fraction=0.25
    )
    tok = gpt2()
    packed = data.prepare(data.Corpus(cfg), tok, tokenizer.fingerprint(tok))
    docs = split_texts(cfg)
    for split in shards.SPLITS:
        reference = blocks_array(run_clm_blocks(getattr(docs, split), tok, 24, add_eos=add_eos))
        ours = blocks_array(getattr(packed, split))
        assert ours.shape == reference.shape and len(ours) > 0
        assert np.array_equal(ours, reference)


@pytest.mark.slow
def test_shakespeare_blocks_match_the_run_clm_reference(tmp_path):
    """The bundled corpus itself, one of its splits (the held-out plays: two whole plays)."""
    cfg = DataConfig(source="shakespeare", block_size=128, cache_dir=str(tmp_path))
    tok = gpt2()
    packed = data.prepare(data.Corpus(cfg), tok, tokenizer.fingerprint(tok))
    reference = run_clm_blocks(split_texts(cfg).validation, tok, 128)
    assert np.array_equal(blocks_array(packed.validation), blocks_array(reference))


def test_gpt2_small_recipe_pads_the_vocabulary_and_never_generates_padding():
    from hftextgen.model import ModelConfig
    from hftextgen.model.build import build_model

    tok = gpt2()
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=50304), tok, 16)
    assert model.get_output_embeddings().out_features == 50304
    assert model.generation_config.suppress_tokens == list(range(len(tok), 50304))
