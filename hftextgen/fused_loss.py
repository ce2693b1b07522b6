"""The language-model loss without the logits: lm_head and cross-entropy fused, chunk by chunk.

A GPT-2's stock loss projects every position onto the whole vocabulary and keeps the result
for the backward pass: batch x block x 50257 floats, in bf16 and again in fp32, then as many
again for their gradients; at GPT-2 small's micro-batch 32 x 1024 that is over 10 GB. Here
the logits of a few thousand rows at a time are made, turned at once into the loss and into
the gradients of the hidden states and of the output matrix, and dropped: the backward pass
only scales the saved gradients. The numbers are those of the stock path (same bf16 matmuls
under autocast, same fp32 log-softmax), up to summation order.

What it buys is memory (larger micro-batches on a GPU) and, on a GPU, memory traffic. It is
not faster on a CPU: there the three vocabulary-sized matrix products dominate a step, and
chunks small enough for the caches re-read the output matrix once each (bench/RESULTS.md).

`install(model)` puts it into a GPT-2's forward for training steps with labels, the way
liger-kernel patches models: evaluation, generation and every other call run the stock
forward, with logits.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

IGNORE_INDEX = -100

# Rows of logits per chunk, as a budget of elements. Large enough that each chunk's matmuls
# stay efficient and the graph torch.compile unrolls stays short (2^28 fp32 = 1 GiB: 8 chunks
# at GPT-2 small's 32 x 1024); on a CPU smaller chunks measured slower, not faster.
CPU_CHUNK_ELEMENTS = 2**26
GPU_CHUNK_ELEMENTS = 2**28


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, min(n_rows, budget // vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, compute_dtype, rows):
        # hidden [N, C] and weight [V, C] arrive in their own dtypes (fp32 master weights); the
        # matmuls run in compute_dtype as autocast would run lm_head, the softmax in fp32 as
        # transformers' ForCausalLMLoss does.
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            valid = targets != IGNORE_INDEX
            safe = torch.where(valid, targets, 0).unsqueeze(1)
            weights = valid.to(torch.float32) * scale  # per-row factor: 0 for ignored rows
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h_chunks = []
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for start in range(0, h.shape[0], rows):
                end = min(start + rows, h.shape[0])
                hc = h[start:end]
                logp = torch.log_softmax((hc @ w.T).float(), dim=1)
                picked = logp.gather(1, safe[start:end]).squeeze(1)
                loss = loss - (picked * weights[start:end]).sum()
                if not needs_grad:
                    continue
                # d loss / d logits = (softmax - onehot) * row weight, made in place in logp.
                probs = logp.exp_()
                probs.scatter_add_(1, safe[start:end], -valid[start:end].to(torch.float32).unsqueeze(1))
                grad_logits = torch.empty(probs.shape, dtype=compute_dtype, device=probs.device)
                torch.mul(probs, weights[start:end].unsqueeze(1), out=grad_logits)  # scale and cast in one pass
                if ctx.needs_input_grad[0]:
                    grad_h_chunks.append(grad_logits @ w)
                if grad_w is not None:
                    grad_w += (grad_logits.T @ hc).float()
        grad_h = torch.cat(grad_h_chunks) if grad_h_chunks else None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # Multiplied unconditionally: testing grad_loss == 1 would cost a device sync per step.
        if grad_h is not None:
            grad_h = (grad_h * grad_loss).to(ctx.hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `hidden @ weight.T` against `labels` shifted by one, as
    transformers' ForCausalLMLoss computes it: mean over the non-ignored targets, or their sum
    divided by `num_items_in_batch` when given (gradient accumulation)."""
    vocab = weight.shape[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        count = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        count = num_items_in_batch.to(hidden.device)
    else:
        count = torch.tensor(num_items_in_batch, device=hidden.device)
    scale = 1.0 / count.to(torch.float32)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = rows or chunk_rows(hidden.shape[0], vocab, hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, scale, compute_dtype, rows)


def supports(model: nn.Module) -> bool:
    """Models whose head is a plain linear map onto the vocabulary and whose loss is
    ForCausalLMLoss: GPT-2 (other architectures may scale or cap logits; they keep theirs)."""
    from transformers import GPT2LMHeadModel

    head = getattr(model, "lm_head", None)
    return (
        isinstance(model, GPT2LMHeadModel)
        and isinstance(head, nn.Linear)
        and head.bias is None
        and getattr(model, "loss_type", "ForCausalLM") == "ForCausalLM"
    )


def install(model: nn.Module) -> bool:
    """Route the model's training steps with labels through `linear_cross_entropy`. Returns
    whether it could (see `supports`). Patches this instance only, never the class."""
    if not supports(model) or getattr(model, "_fused_loss", False):
        return supports(model)
    stock = type(model).forward

    @functools.wraps(stock)  # the signature Trainer inspects (labels, **kwargs) stays the stock one
    def forward(self, input_ids=None, *args, labels=None, **kwargs):
        if labels is None or not self.training or args:
            return stock(self, input_ids, *args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        body = self.transformer(input_ids, **kwargs)
        loss = linear_cross_entropy(body.last_hidden_state, self.lm_head.weight, labels, num_items)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
    model._fused_loss = True
    return True
