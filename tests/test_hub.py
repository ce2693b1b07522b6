"""Hub access without a network: the reachability probe, the online and cached paths (with
loaders the tests fake), and the arguments hftextgen hands to datasets.load_dataset."""

from __future__ import annotations

import time

import datasets
import huggingface_hub.constants
import pytest
from oracle import split_texts

from hftextgen import hub
from hftextgen.data import DataConfig
from hftextgen.errors import UserError


def test_probe_says_unreachable_quickly(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    start = time.monotonic()
    assert hub.hub_reachable() is False
    assert time.monotonic() - start < 5


def test_probe_goes_through_huggingface_hubs_session(monkeypatch):
    """The session huggingface_hub downloads with (its proxies, its endpoint), not a socket of our own:
    any answer means reachable, an error status included; no answer means unreachable."""
    import huggingface_hub.utils

    asked = []

    class Session:
        def __init__(self, fails):
            self.fails = fails

        def head(self, url, timeout):
            asked.append((url, timeout))
            if self.fails:
                raise ConnectionError("proxy refused")
            return type("Response", (), {"status_code": 401})()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example")
    for fails, reachable in ((False, True), (True, False)):
        monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda fails=fails: Session(fails))
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable() is reachable
    assert asked == [("https://hub.example", 3.0)] * 2
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.hub_reachable.cache_clear()
    assert hub.hub_reachable() is False and len(asked) == 2  # offline: not even asked


def test_online_path_passes_arguments_and_explains_failures(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    calls = []
    assert (
        hub.load_from_hub(
            lambda n, **kw: calls.append((n, kw)) or "ok", "org/m", "model", "model.name_or_path", revision="v1"
        )
        == "ok"
    )
    assert calls == [("org/m", {"revision": "v1"})]

    def missing(name, **kw):
        raise OSError("org/m is not a valid model identifier\nlong details")

    with pytest.raises(
        UserError,
        match=r"^model.name_or_path: could not load the model 'org/m' from the Hugging Face Hub: "
        r"org/m is not a valid model identifier$",
    ):
        hub.load_from_hub(missing, "org/m", "model", "model.name_or_path")


def test_offline_uses_the_local_cache_when_it_has_the_files():
    def cached_only(name, local_files_only=False):
        if not local_files_only:
            raise AssertionError("tried the network")
        return "from cache"

    assert hub.load_from_hub(cached_only, "gpt2", "model", "model.name_or_path") == "from cache"


def test_paths_are_not_sent_to_the_hub():
    with pytest.raises(UserError, match="no such directory: ./not/here"):
        hub.load_from_hub(lambda *a, **k: None, "./not/here", "model", "model.name_or_path")


def test_hub_dataset_arguments(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{kwargs['split']} row {i} " * 5 for i in range(4)] + [""]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(
        source="hub",
        dataset="Salesforce/wikitext",
        dataset_config="wikitext-2-raw-v1",
        revision="abc",
        validation_split="validation",
    )
    docs = split_texts(cfg)
    assert calls == [
        ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1", "split": "train", "revision": "abc"}),
        ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1", "split": "validation", "revision": "abc"}),
    ]
    assert len(docs.train) == 4 and list(docs.validation["id"]) == [f"validation:{i}" for i in range(4)]
