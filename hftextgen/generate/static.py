"""Static-cache decoding: GPT-2's decoding loop on preallocated key/value buffers, each step one CUDA graph.

generate.Generator hands it, for `generate.cache: static`, each window it would give
`model.generate` (left-padded ids, their mask, the GenerationConfig and our logits processors)
and gets back the new tokens `generate` would return: the same tokens, at a fraction of the cost
per step. transformers' generate pays, per token, its Python loop, a host sync to check the
stopping criteria, and a kernel launch per operation; its static cache with torch.compile
removes only part of that. Here:

- prefill: one forward over the window writes its keys and values into buffers sized for the
  window plus the new tokens;
- decoding step: embed the last token, attend over the buffers under a mask, logits, the
  logits processors, the seeded Gumbel draw (sampling.SeededGumbel's keys, computed on the
  device), argmax, write the token. Shapes are fixed and every counter lives on the device, so
  on a GPU the whole step is captured once per (batch, buffer length, settings) and replayed;
- the host reads the tokens only every few steps (after 1, 2, 4, 8 and then every 16) to learn
  where rows end, by transformers' own stopping criteria (EOS, stop strings), and cuts and pads
  the rows exactly as generate does. A row that has ended keeps running until the batch ends,
  which changes nothing for the other rows.

The logits processors and stopping criteria are the ones generate itself would build, from the
same GenerationConfig merged with the model's generation_config (a padded vocabulary's
suppress_tokens, say), through generate's own helpers; any the step cannot run on the device
(no_repeat_ngram_size, which works on Python lists) sends the call back to generate, with a
one-line note. Other architectures than GPT-2 go back to generate the same way.

On a CPU the same step runs eagerly (no graphs): tests/test_decode.py checks there that it gives
generate's tokens. Same tokens means the same operations in the same order; on a GPU, attention
over a masked buffer instead of a growing one may round differently in the last bit, which can
flip a near-tie (transformers' own static and dynamic caches differ the same way).
"""

from __future__ import annotations

import collections
import sys

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria

from .sampling import SeededGumbel, gumbel_noise

CHECK_EVERY = 16  # decoding steps between two reads of the tokens by the host, once past the first few
ALIGN = 64  # buffer lengths are rounded up to this, so windows of nearby sizes share a captured step
KEPT = 2  # captured steps kept (each holds its buffers: 3.2 GB for GPT-2 small at batch 64 x 1024 in fp32)
# Processors that only read the scores (and, for the penalty, the ids so far): they run on the device.
ON_DEVICE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
)


class _SuppressMask:
    """SuppressTokensLogitsProcessor with its mask made once (its torch.isin can sync the host)."""

    def __init__(self, processor: SuppressTokensLogitsProcessor, vocab: int, device: torch.device):
        scores = processor(None, torch.zeros(1, vocab, device=device))
        self.mask = torch.isinf(scores[0])

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, -float("inf"), scores)


def unsupported(lm) -> str | None:
    """Why this model cannot decode here, or None."""
    if not isinstance(lm, GPT2LMHeadModel):
        return f"{type(lm).__name__} is not a GPT-2, the one architecture it implements"
    config = lm.config
    if config.add_cross_attention:
        return "a GPT-2 with cross-attention"
    attention = config._attn_implementation
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention} (it has sdpa and eager)"
    if attention == "eager" and config.reorder_and_upcast_attn:
        return "reorder_and_upcast_attn"
    return None


class _Call:
    """One generate call as the decoder runs it: its processors, its criteria, its seeds."""

    def __init__(self, ops: list, gumbel: SeededGumbel | None, eos: torch.Tensor | None, stops: list, pad: int):
        self.ops, self.gumbel, self.eos, self.stops, self.pad = ops, gumbel, eos, stops, pad

    def signature(self) -> tuple:
        """What a captured step bakes in: the processors' types and settings (their tensors are
        copied in per call, see _State.load)."""
        parts = []
        for op in self.ops:
            scalars = tuple(sorted((k, v) for k, v in vars(op).items() if isinstance(v, (bool, int, float, str))))
            tensors = tuple(sorted((k, tuple(v.shape)) for k, v in vars(op).items() if torch.is_tensor(v)))
            parts.append((type(op).__name__, scalars, tensors))
        return (tuple(parts), self.gumbel is not None)


def build_call(lm, ids, mask, config, processors, tokenizer) -> _Call | str:
    """generate's own processors and criteria for this call, or why the decoder cannot run them."""
    try:
        config, _ = lm._prepare_generation_config(config)
        lm._prepare_special_tokens(config, True, device=ids.device)
        built = lm._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=ids.shape[1],
            encoder_input_ids=ids,
            logits_processor=LogitsProcessorList(processors),
            device=ids.device,
            model_kwargs={"attention_mask": mask},
        )
        criteria = lm._get_stopping_criteria(config, StoppingCriteriaList(), tokenizer)
    except (AttributeError, TypeError) as exc:  # another transformers version's internals
        return f"cannot build generate's processors with this transformers ({exc})"
    if config.do_sample or config.num_beams > 1 or config.num_return_sequences > 1 or config.token_healing:
        return "it decodes greedily or with our seeded sampling only (no beams, no torch.multinomial)"
    ops, gumbel = [], None
    for p in built:
        if gumbel is not None:
            return f"{type(p).__name__} after the seeded sampler"
        if isinstance(p, SeededGumbel):
            gumbel = p
        elif isinstance(p, SuppressTokensLogitsProcessor):
            ops.append(_SuppressMask(p, lm.lm_head.out_features, ids.device))
        elif isinstance(p, ON_DEVICE):
            ops.append(p)
        else:
            return f"{type(p).__name__} runs on the host"
    eos, stops = None, []
    for c in criteria:
        if isinstance(c, EosTokenCriteria):
            eos = c.eos_token_id.cpu()
        elif isinstance(c, StopStringCriteria):
            stops.append(c)
        elif not isinstance(c, MaxLengthCriteria):  # the length is max_new_tokens, which the loop runs
            return f"stopping criterion {type(c).__name__}"
    pad = config._pad_token_tensor
    return _Call(ops, gumbel, eos, stops, 0 if pad is None else int(pad))


class _State:
    """The buffers of one (batch, length, settings) and, on a GPU, the step captured on them."""

    def __init__(self, lm, batch: int, length: int, ops: list, gumbel: bool):
        config, device = lm.config, lm.device
        dtype = lm.transformer.h[0].attn.c_attn.weight.dtype
        # Keys and values of a layer in one buffer [2, batch, heads, length, head size]: one write a step.
        shape = (2, batch, config.n_head, length, config.n_embd // config.n_head)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.dtype = dtype
        vocab = lm.lm_head.out_features

        def longs(*size, fill=0):
            return torch.full(size, fill, dtype=torch.long, device=device)

        self.vocab = vocab
        self.valid = torch.ones(batch, length, dtype=torch.bool, device=device)  # False: left padding
        self.seen = longs(batch, length, fill=vocab)  # ids so far; `vocab` = none (processors drop it)
        self.out = longs(batch, length)  # the tokens chosen, step by step
        self.last = longs(batch)  # the token the next step reads
        self.t = longs()  # tokens chosen so far in this call
        self.width = longs(fill=1)  # the window's length, where the first new token goes
        self.lengths = longs(batch, fill=1)  # real tokens of each row's window
        self.seed_terms = longs(batch)  # (seed * SEED) & MASK per row
        self.done = longs(batch)  # tokens each row made before this window (sliding windows)
        self.slots = torch.arange(length, device=device)
        self.ops, self.gumbel = ops, gumbel
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, ids: torch.Tensor, mask: torch.Tensor, call: _Call) -> None:
        width = ids.shape[1]
        self.valid.fill_(True)
        self.valid[:, :width].copy_(mask.bool())
        self.seen.fill_(self.vocab)
        self.seen[:, :width].copy_(ids)
        self.t.fill_(0)
        self.width.fill_(width)
        self.lengths.copy_(mask.sum(1))
        if call.gumbel is not None:
            terms = [(seed * SeededGumbel.SEED) & SeededGumbel.MASK for seed in call.gumbel.seeds]
            self.seed_terms.copy_(torch.tensor(terms))
            self.done.copy_(torch.tensor(call.gumbel.done))
        for mine, theirs in zip(self.ops, call.ops, strict=True):  # per-call tensors, into captured memory
            for name, value in vars(theirs).items():
                if torch.is_tensor(value) and getattr(mine, name) is not value:
                    getattr(mine, name).copy_(value)


class StaticDecoder:
    """Decodes windows for one model; keeps its last KEPT captured steps between calls."""

    def __init__(self, lm, graphs: bool | None = None, compile: bool = False):
        self.lm = lm
        self.graphs = lm.device.type == "cuda" if graphs is None else graphs
        # compile: the step through torch.compile (fused kernels, fewer launches) before capture;
        # a long first call per shape, and fused arithmetic may round differently from generate's.
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.eager = lm.config._attn_implementation == "eager"
        self.states: collections.OrderedDict[tuple, _State] = collections.OrderedDict()
        self.fallback: str | None = None  # why the last call went back to generate, if it did
        self.capture_error: str | None = None  # why a step could not be captured, if one could not
        self._noted: set[str] = set()

    @classmethod
    def create(cls, lm) -> StaticDecoder | None:
        """A decoder for lm, or None (with a note) when lm is not a model it implements."""
        why = unsupported(lm)
        if why is None:
            return cls(lm)
        _note(f"generate.cache static: {why}: transformers' static cache is used instead")
        return None

    def __call__(self, ids, mask, config, processors, tokenizer, streamer=None) -> list[list[int]] | None:
        """The new tokens of each row as generate returns them, or None: then generate must run it."""
        device = self.lm.device
        ids, mask = ids.to(device), mask.to(device)
        call = (
            build_call(self.lm, ids, mask, config, processors, tokenizer) if not self.lm.training else "training mode"
        )
        if isinstance(call, str):
            self.fallback = call
            if call not in self._noted:
                self._noted.add(call)
                _note(f"generate.cache static: {call}: this call runs through transformers' generate")
            return None
        self.fallback = None
        new = config.max_new_tokens
        state = self._state(ids.shape[0], -(-(ids.shape[1] + new) // ALIGN) * ALIGN, call)
        state.load(ids, mask, call)
        ends = _Ends(ids.cpu(), call)
        if streamer is not None:
            streamer.put(ids.cpu())
        self._choose(state, self._prefill(state, ids, mask))
        made, streamed = 1, 0
        while True:
            tokens = state.out[:, :made].cpu()  # the one host sync, every few steps
            finished = ends.read(tokens)
            if streamer is not None:
                streamed = ends.stream(tokens, streamed, streamer)
            if finished or made == new:
                break
            target = min(new, made + min(made, CHECK_EVERY))
            for _ in range(target - made):
                state.graph.replay() if state.graph is not None else self.step(state)
            made = target
        if streamer is not None:
            streamer.end()
        return ends.rows(tokens)

    def _state(self, batch: int, length: int, call: _Call) -> _State:
        key = (batch, length, call.signature())
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= KEPT:
            self.states.popitem(last=False)
        state = _State(self.lm, batch, length, call.ops, call.gumbel is not None)
        if self.graphs:
            try:
                self._capture(state)
            except RuntimeError as exc:  # an operation that syncs the host cannot be captured
                state.graph = None
                self.capture_error = str(exc).splitlines()[0]
                _note(
                    f"generate.cache static: the decoding step could not be captured as a CUDA graph "
                    f"({self.capture_error}): its steps run one by one"
                )
        self.states[key] = state
        return state

    def _capture(self, state: _State) -> None:
        # Warm-up on a side stream (cuBLAS handles, kernel selection), then record one step. The
        # buffers hold harmless values here (every slot valid, windows of one token); load() sets
        # them for each call.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(state)
        torch.cuda.current_stream().wait_stream(side)
        state.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(state.graph):
            self.step(state)

    def _prefill(self, state: _State, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Positions as generate makes them: counted over the real tokens, 0 on padding.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        width = ids.shape[1]
        bias = None  # no padding: causal attention, as generate runs it
        if self.eager or not bool(mask.all()):
            causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
            eye = torch.eye(width, dtype=torch.bool, device=ids.device)  # a padding row sees itself: no NaN
            bias = self._bias(state, (mask.bool()[:, None, None, :] & causal) | eye)
        return self._forward(state, ids, positions, bias, slot=None)

    def _step(self, state: _State) -> None:
        """One new token per row: everything on the device, nothing read back."""
        slot = state.width + state.t - 1  # where the last token's keys and values go
        bias = self._bias(state, state.valid[:, None, None, :] & (state.slots <= slot))
        logits = self._forward(state, state.last[:, None], (state.lengths + state.t - 1)[:, None], bias, slot)
        self._choose(state, logits)

    def _bias(self, state: _State, allowed: torch.Tensor) -> torch.Tensor:
        """The mask as the additive bias attention applies, made once for all layers: what
        scaled_dot_product_attention turns a boolean mask into (-inf), or eager attention's
        mask (the dtype's minimum)."""
        low = torch.finfo(state.dtype).min if self.eager else -float("inf")
        return torch.zeros(allowed.shape, dtype=state.dtype, device=allowed.device).masked_fill(~allowed, low)

    def _forward(self, state: _State, ids, positions, bias, slot) -> torch.Tensor:
        """GPT2LMHeadModel's forward through its own modules, keys and values into the buffers;
        fp32 logits of the last position, as generate takes them."""
        model = self.lm.transformer
        batch, width = ids.shape
        x = model.wte(ids) + model.wpe(positions)
        for i, block in enumerate(model.h):
            attn = block.attn
            qkv = attn.c_attn(block.ln_1(x)).view(batch, width, 3, -1, attn.head_dim).permute(2, 0, 3, 1, 4)
            kv = state.kv[i]
            if slot is None:  # prefill: the window fills the first slots
                kv[:, :, :, :width].copy_(qkv[1:])
                kv = kv[:, :, :, :width]
            else:
                kv.index_copy_(3, slot.view(1), qkv[1:])
            a = self._attend(attn, qkv[0], kv[0], kv[1], bias)
            x = attn.c_proj(a.transpose(1, 2).contiguous().reshape(batch, width, -1)) + x
            x = x + block.mlp(block.ln_2(x))
        return self.lm.lm_head(model.ln_f(x[:, -1:]))[:, -1].float()

    def _attend(self, attn, q, keys, values, bias) -> torch.Tensor:
        scale = _scaling(attn)
        if not self.eager:
            causal = bias is None and q.shape[2] > 1
            return nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=bias, scale=scale, is_causal=causal
            )
        weights = torch.matmul(q, keys.transpose(-1, -2)) * scale + bias
        weights = nn.functional.softmax(weights, dim=-1).type(values.dtype)
        return torch.matmul(weights, values)

    def _choose(self, state: _State, logits: torch.Tensor) -> None:
        """generate's processors, then our seeded draw, then argmax; the token goes into the buffers."""
        scores = logits
        for op in state.ops:
            scores = op(state.seen, scores)
        if state.gumbel:
            step_terms = ((state.done + state.t) * SeededGumbel.STEP) & SeededGumbel.MASK
            scores = scores + gumbel_noise((state.seed_terms + step_terms) & SeededGumbel.MASK, scores.shape[1])
        token = scores.argmax(-1)
        state.out.index_copy_(1, state.t.view(1), token[:, None])
        state.seen.index_copy_(1, (state.width + state.t).view(1), token[:, None])
        state.last.copy_(token)
        state.t += 1


class _Ends:
    """Where each row ends, by generate's stopping criteria, read off the tokens as they come;
    then the rows cut and padded as generate returns them."""

    def __init__(self, window: torch.Tensor, call: _Call):
        self.window, self.call = window, call
        self.end: list[int | None] = [None] * window.shape[0]  # step of the token that ended the row
        self.checked = 0  # steps looked at so far

    def read(self, tokens: torch.Tensor) -> bool:
        """Look at the steps not seen yet; True once every row has ended."""
        start = self.checked
        if self.call.eos is not None:  # EOS: all new steps at once
            hit = torch.isin(tokens[:, start:], self.call.eos)
            for row in hit.any(1).nonzero().flatten().tolist():
                if self.end[row] is None:
                    self.end[row] = start + int(hit[row].int().argmax())
        for step in range(start, tokens.shape[1]) if self.call.stops else ():  # stop strings: step by step
            if all(end is not None and end <= step for end in self.end):
                break
            so_far = torch.cat([self.window, tokens[:, : step + 1]], dim=1)
            for criterion in self.call.stops:
                for row in criterion(so_far, None).cpu().nonzero().flatten().tolist():
                    if self.end[row] is None or self.end[row] > step:
                        self.end[row] = step
        self.checked = tokens.shape[1]
        return all(end is not None for end in self.end)

    def _padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """generate's tokens: pad after a row's end (when EOS is a criterion, as generate does),
        and no step after the one that ended the last row."""
        out = tokens.clone()
        if self.call.eos is not None:
            for row, end in enumerate(self.end):
                if end is not None:
                    out[row, end + 1 :] = self.call.pad
        if all(e is not None for e in self.end):
            out = out[:, : max(self.end) + 1]
        return out

    def stream(self, tokens: torch.Tensor, streamed: int, streamer) -> int:
        """Hand the streamer the steps it has not had, one step at a time as generate does."""
        out = self._padded(tokens)
        for step in range(streamed, out.shape[1]):
            streamer.put(out[:, step])
        return out.shape[1]

    def rows(self, tokens: torch.Tensor) -> list[list[int]]:
        return self._padded(tokens).tolist()


def _scaling(attn) -> float:
    if hasattr(attn, "scaling"):
        return attn.scaling
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0  # transformers before GPT2Attention.scaling
    return scale / (attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale


def _note(message: str) -> None:
    print(f"hftextgen: note: {message}", file=sys.stderr, flush=True)
