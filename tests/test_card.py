"""What a finished run shows: loss.png, README.md as a model card, and TensorBoard events."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from hftextgen.train import card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_loss_plot_is_a_png_with_a_drawing(trained_run):
    path = trained_run / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 500
    # Not blank: many distinct colours (lines, text), and the training line's blue is there.
    assert pixels[..., :3].std() > 0.05
    assert len(np.unique(pixels[..., :3].reshape(-1, 3).round(2), axis=0)) > 50
    blue = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's tab:blue
    assert (np.abs(pixels[..., :3] - blue).sum(axis=-1) < 0.05).sum() > 100


def test_model_card_metadata_and_content(trained_run):
    text = (trained_run / "README.md").read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "hftextgen" in meta["tags"]
    scores = json.loads((trained_run / "eval.json").read_text())
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["perplexity"] == pytest.approx(scores["perplexity"], rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(scores["bits_per_byte"], rel=1e-4)

    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"

    # The body: metrics, the plot, samples of the run, data, how to load it, the recipe.
    assert f"| perplexity | {scores['perplexity']:,.3f} |" in text
    assert "![Training and held-out loss](loss.png)" in text
    sample = json.loads((trained_run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] + sample["completion"] in text
    assert "| train | 6 |" in text and "| validation | 2 |" in text
    assert f'pipeline("text-generation", model="{trained_run}")' in text
    assert "n_embd: 16" in text  # the resolved recipe, collapsed at the end


def test_card_is_remade_from_the_run_directory(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    (copy / "loss.png").unlink()
    (copy / "README.md").unlink()
    written = card.write(copy, model_id="someone/tiny")
    assert [p.name for p in written] == ["loss.png", "README.md"]
    assert 'model="someone/tiny"' in (copy / "README.md").read_text()


def test_plot_with_nothing_to_draw_is_skipped(tmp_path):
    assert card.plot_losses([{"step": 3, "train_runtime": 1.0}], 128, tmp_path / "loss.png", "x") is False
    assert not (tmp_path / "loss.png").exists()


def test_tensorboard_holds_losses_throughput_perplexity_and_samples(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/tokens",
        "eval/loss",
        "eval/perplexity",
        "eval/bits_per_byte",
        "final/perplexity",
        "final/bits_per_byte",
    ):
        assert tag in scalars, tag
    tokens = {e.step: e.value for e in events.Scalars("train/tokens")}
    # The tokens trained: an epoch's steps hold its blocks (the last step of it fewer than 4), the
    # steps after it 4 blocks each, of 32 tokens.
    blocks = json.loads((trained_run / "data_report.json").read_text())["train"]["blocks"]
    per_epoch = -(-blocks // 4)
    assert 60 > per_epoch and blocks % 4
    assert tokens[60] == (blocks + (60 - per_epoch) * 4) * 32
    final = events.Scalars("final/bits_per_byte")[0]
    assert final.value == pytest.approx(json.loads((trained_run / "eval.json").read_text())["bits_per_byte"])
    assert "final/samples/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
@pytest.mark.extended
def test_tensorboard_curves_do_not_double_back_after_a_resume(corpus, tmp_path, run_cli):
    import shutil

    from conftest import files_args
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = files_args(corpus, run_dir, "--train.save_steps", "4", "--train.eval_steps", "100")
    code, _, err = run_cli(*args, "--train.max_steps", "8", "--evaluate.at_end_of_training", "false")
    assert code == 0, err
    shutil.rmtree(run_dir / "checkpoint-8")  # as if it had stopped after logging step 8, saved at 4
    code, _, err = run_cli(*args, "--train.max_steps", "8", "--train.resume_from_checkpoint", "last")
    assert code == 0, err
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 9)), steps


def test_counts_ticks_and_smoothing():
    assert [card._count(n) for n in (999, 1234, 1_500_000, 2e9, 3e12)] == ["999", "1.23k", "1.5M", "2B", "3T"]
    # Round numbers of each decade between the perplexities the loss axis spans.
    assert card._perplexity_ticks(30, 600) == [50, 100, 200, 500]
    assert card._perplexity_ticks(1.5, 3) == [2]
    # A centred moving average: a constant stays put, a step is spread evenly over its middle.
    assert card._smooth([2.0] * 45) == [2.0] * 45
    smoothed = card._smooth([0.0] * 30 + [1.0] * 30)
    assert smoothed[0] == 0 and smoothed[-1] == 1 and smoothed[29] == pytest.approx(0.4)
