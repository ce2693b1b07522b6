"""Encoders: a tokenizer's route (model.encoder_spec: tiktoken, the Rust backend, or the tokenizer
itself) built into a function texts -> token ids, the one builder the tokenizer and the workers use.

The route is plain data, so a worker process builds its encoder without importing transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Encoder = Callable[[list[str]], list[np.ndarray]]


def build_encoder(spec: dict, threads: int = 1) -> Encoder:
    """model.encoder_spec back into a function texts -> ids (one array per text); when the spec
    holds its probes, a check that it still gives their reference ids (tokenizer.PROBES)."""
    route = spec["route"]
    if route == "tiktoken":
        import tiktoken

        encoding = tiktoken.Encoding(
            "gpt2-hftextgen", pat_str=spec["pattern"], mergeable_ranks=spec["ranks"], special_tokens=spec["special"]
        )

        def one(text: str) -> np.ndarray:
            # allowed_special="all": a special token written in the text is that token, as in transformers.
            return encoding.encode_to_numpy(text, allowed_special="all")

        if threads > 1:
            pool = ThreadPoolExecutor(threads)
            encode = lambda texts: list(pool.map(one, texts))  # noqa: E731
        else:
            encode = lambda texts: [one(t) for t in texts]  # noqa: E731
    elif route == "backend":
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(spec["json"])
        # What tokenizer(texts) sets on the backend before it encodes.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = spec["encode_special_tokens"]

        def encode(texts: list[str]) -> list[np.ndarray]:
            return [np.asarray(e.ids, np.int64) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    else:
        tokenizer = spec["tokenizer"]

        def encode(texts: list[str]) -> list[np.ndarray]:
            ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
            return [np.asarray(doc, np.int64) for doc in ids["input_ids"]]

    probes = spec.get("probes")
    if probes is not None and [a.tolist() for a in encode(probes["texts"])] != probes["ids"]:
        raise RuntimeError(f"the {route} encoder rebuilt in a worker differs from the tokenizer on its probes")
    return encode
