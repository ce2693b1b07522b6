"""The language-model loss without the logits: the output layer and cross-entropy fused, chunk by chunk.

A causal LM's stock loss projects every position onto the whole vocabulary and keeps the result
for the backward pass: batch x block x vocabulary floats, in bf16 and again in fp32, then as
many again for their gradients (GPT-2's 50257 tokens at 16 x 256 positions: 5-7 GB at the peak
on a CPU; at GPT-2 small's 32 x 1024 on a GPU, 23 GB). Here the logits of a chunk of rows at a
time are made, turned at once into the loss and into the gradients of the hidden states and of
the output matrix, and dropped: the backward pass only scales the saved gradients. The numbers
are those of the stock path (the matmuls in the autocast dtype, the softmax in fp32), up to
summation order and the rounding of each chunk's share of the output matrix's gradient.

On a CPU it also saves time where the logits are large. The stock path streams them through
memory about ten times (bf16, the fp32 copy, log-softmax, its backward, the cast back; the
log-softmax backward alone took over a third of a step at 4,096 rows), and allocates each of
those 0.4-0.8 GB tensors anew every step: torch asks glibc for 64-byte-aligned blocks, which
glibc does not serve from a freed block of the same size (the small remainder it split off
stays in its thread cache and keeps the block from merging), so the heap grows and the kernel
hands out and zeroes fresh pages, step after step. Here each chunk takes four light passes
(the fp32 copy, its largest value, the softmax, the cast back) in two buffers kept from step
to step. bench/RESULTS.md has the measurements.

`install(model)` puts it into the forward of any causal LM whose logits are a plain linear map of
its base model's last hidden states, for training steps with labels, the way liger-kernel patches
models: evaluation, generation and every other call run the stock forward, with logits.
`install(model, kernel="liger")` uses liger-kernel's fused linear cross-entropy (a Triton kernel
for CUDA GPUs) instead, where that package is installed.
"""

from __future__ import annotations

import functools
import math
import threading
import types
from collections.abc import Callable

import torch
from torch import nn

from ..runtime import eval_mode

IGNORE_INDEX = -100

# Memory for one chunk on a CPU: its logits in the compute dtype and in fp32. 256 MiB holds 890
# rows of GPT-2's vocabulary in bf16, so a step of 4,096 rows runs in five chunks: measured
# within 3% of one chunk per GiB and 1.2 GB leaner (a chunk re-reads the output matrix, which is
# small next to its logits); 64 MiB chunks were 10% slower.
CPU_CHUNK_BYTES = 2**28
# On a GPU, elements per chunk: large enough that each chunk's matmuls stay efficient and the
# graph torch.compile unrolls stays short (2^28 fp32 = 1 GiB: 8 chunks at GPT-2 small's 32 x 1024).
GPU_CHUNK_ELEMENTS = 2**28

# Config fields with which a model rescales or caps its logits before the loss (Gemma 2/3,
# Cohere, Granite, Falcon-H1, MiniCPM, ...): the fused loss of the plain product would train a
# different model, so these keep their own. A value of None (or a scale of 1) changes nothing.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
    "mup_width_multiplier",
)


def chunk_rows(n_rows: int, vocab: int, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk: as many as the budget allows, spread evenly over the chunks needed (1,024
    rows in two chunks are 512 + 512, not 890 + 134: a small last chunk runs its matmuls slowly)."""
    if device.type == "cpu":
        per_row = vocab * (4 + (compute_dtype.itemsize if compute_dtype != torch.float32 else 0))
        most = max(1, CPU_CHUNK_BYTES // per_row)
    else:
        most = max(1, GPU_CHUNK_ELEMENTS // vocab)
    chunks = -(-n_rows // most)
    return max(1, -(-n_rows // chunks))


# `auto` fuses on a CPU when a micro-batch's fp32 logits exceed this. Above it the stock loss's
# copies of them (bf16, fp32, log-softmax, their gradients) are most of a step's memory: at
# bench/tiny-gpt2.yaml's 1,024 x 50,257 (206 MB) the fused loss took 0.43 GB where the stock one
# took 2.6 GB, and 18% less CPU time on an AMD EPYC (Zen 5; 11% more on an Intel Xeon VM in
# training). Below it (the default recipe: 1,024 x 4,096, 17 MB) they are small and the stock
# loss runs with no overhead.
CPU_FUSE_BYTES = 2**26


def _large_logits(model: nn.Module, rows: int | None) -> bool:
    """Whether `rows` of the model's fp32 logits exceed CPU_FUSE_BYTES (unknown rows: yes)."""
    head = model.get_output_embeddings()
    return rows is None or head is None or rows * head.weight.shape[0] * 4 > CPU_FUSE_BYTES


def installed(model: nn.Module) -> str | None:
    """The kernel a model's training loss runs through ("hftextgen", "liger"), or None: stock."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    return getattr(base, "_fused_loss", None)


def logits_bytes(rows: int, vocab: int, device: torch.device) -> int:
    """What the fused loss holds of the logits at once: one chunk, its logits in bf16 and fp32."""
    per_row = vocab * 6
    return min(rows, chunk_rows(rows, vocab, device, torch.bfloat16)) * per_row


class Workspace(threading.local):
    """Buffers reused from call to call on a CPU, one set per thread; elsewhere (a GPU's caching
    allocator already reuses memory) and under torch.compile, fresh tensors."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu" or torch.compiler.is_compiling():
            return torch.empty(shape, dtype=dtype, device=device)
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < size:
            self.buffers.pop(name, None)  # freed before its successor is allocated
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weight, scale, compute_dtype, rows, workspace):
        # hidden [N, C] and weight [V, C] arrive in their own dtypes (fp32 master weights); the
        # matmuls run in compute_dtype as autocast would run the output layer, the softmax in fp32
        # as transformers' ForCausalLMLoss does. row_weight [N]: scale, or 0 for ignored targets.
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, width = hidden.shape
        vocab = weight.shape[0]
        device = hidden.device
        reduced = compute_dtype != torch.float32
        with torch.autocast(device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            index = targets.unsqueeze(1)
            loss = torch.zeros((), dtype=torch.float32, device=device)
            # The gradients leave out the rows' weights: they are applied in backward to these
            # small products, not to the vocabulary-sized ones; ignored rows are masked in h.
            # The output matrix's gradient is made transposed, [C, V]: h.T @ grad runs faster than
            # grad.T @ h on a CPU.
            grad_h = torch.empty((n, width), dtype=compute_dtype, device=device) if needs_h else None
            grad_wt = torch.zeros((width, vocab), dtype=torch.float32, device=device) if needs_w else None
            h_masked = h * (row_weight != 0).to(compute_dtype).unsqueeze(1) if needs_w else None
            for start in range(0, n, rows):
                end = min(start + rows, n)
                logits = workspace.get("logits", (end - start, vocab), compute_dtype, device)
                torch.mm(h[start:end], w.T, out=logits)
                probs = workspace.get("probs", logits.shape, torch.float32, device).copy_(logits) if reduced else logits
                picked = probs.gather(1, index[start:end])
                largest = probs.amax(1, keepdim=True)
                torch._softmax(probs, 1, False, out=probs)
                # log-sum-exp from the largest probability, which is at least 1/V and so never
                # underflows (the target's may): one cheap pass where log-softmax + exp take two.
                log_normaliser = largest - probs.amax(1, keepdim=True).log()
                loss -= ((picked - log_normaliser).squeeze(1) * row_weight[start:end]).sum()
                if not (needs_h or needs_w):
                    continue
                # d loss / d logits = softmax - onehot, in compute_dtype over the logits (their last
                # use); the target's entry is made from its fp32 probability, as the stock path does.
                target_probs = probs.gather(1, index[start:end])
                grad = logits.copy_(probs) if reduced else probs
                grad.scatter_(1, index[start:end], (target_probs - 1).to(compute_dtype))
                if needs_h:
                    torch.mm(grad, w, out=grad_h[start:end])
                if needs_w and reduced:
                    part = workspace.get("grad_w", (width, vocab), compute_dtype, device)
                    grad_wt += torch.mm(h_masked[start:end].T, grad, out=part)  # accumulated in fp32
                elif needs_w:
                    grad_wt.addmm_(h_masked[start:end].T, grad)
        ctx.save_for_backward(grad_h, grad_wt, row_weight, scale)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_wt, row_weight, scale = ctx.saved_tensors
        # Multiplied unconditionally: testing grad_loss == 1 would cost a device sync per step.
        grad_w = None
        if grad_h is not None:
            grad_h = (grad_h * (row_weight * grad_loss).unsqueeze(1)).to(ctx.hidden_dtype)
        if grad_wt is not None:
            # Handed back transposed: autograd lays it out as the weight while it adds it to the
            # input embedding's gradient (tied weights) or stores it (one pass either way).
            grad_w = torch.mul(grad_wt, scale * grad_loss).T
        return grad_h, grad_w, None, None, None, None, None, None


def shifted_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """The targets of every position, flat: the next label (ForCausalLMLoss's shift), or
    `shift_labels` where the caller shifted them already (context parallelism)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def normaliser(targets: torch.Tensor, num_items_in_batch, ignore_index: int, device: torch.device) -> torch.Tensor:
    """What the summed loss is divided by: the non-ignored targets, or `num_items_in_batch`
    (gradient accumulation), as transformers' fixed_cross_entropy does."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), device=device)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    rows: int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `hidden @ weight.T` against `labels` shifted by one, as
    transformers' ForCausalLMLoss computes it: mean over the non-ignored targets, or their sum
    divided by `num_items_in_batch` when given (gradient accumulation)."""
    vocab = weight.shape[0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
    valid = targets != ignore_index
    scale = 1.0 / normaliser(targets, num_items_in_batch, ignore_index, hidden.device)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = rows or chunk_rows(hidden.shape[0], vocab, hidden.device, compute_dtype)
    row_weight = valid.to(torch.float32) * scale
    return _fused(hidden, weight, torch.where(valid, targets, 0), row_weight, scale, compute_dtype, rows, workspace)


# Outside any compiled graph: under torch.compile on an H200 (inductor, bf16, 8 chunks) this
# function's backward gave zero gradients, so the model trained nothing (bench/RESULTS.md, GPU),
# although the compiled CPU run matches the stock loss; run eagerly it is checked against the
# stock loss on both. Its work is a few large matmuls a chunk, which compiling does not speed up.
@torch.compiler.disable
def _fused(hidden, weight, targets, row_weight, scale, compute_dtype, rows, workspace) -> torch.Tensor:
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, row_weight, scale, compute_dtype, rows, workspace or Workspace()
    )


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The same loss through liger-kernel's fused linear cross-entropy (Triton, CUDA only)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
    loss = _liger(hidden, weight, targets, ignore_index)
    return loss / normaliser(targets, num_items_in_batch, ignore_index, hidden.device)


# Outside any compiled graph: dynamo cannot trace liger-kernel 0.8.5's function (a `.item()`,
# then an addmm with out_dtype it fails on: measured on an H200 under train.torch_compile).
@torch.compiler.disable
def _liger(hidden, weight, targets, ignore_index: int) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction="sum")


def liger_unavailable() -> str | None:
    """Why liger-kernel's loss cannot run here, or None."""
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not torch.cuda.is_available():
        return "liger-kernel's kernels are Triton kernels for CUDA GPUs, and there is none here"
    return None


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else getattr(model, "lm_head", None)


def unsupported(model: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for this model's own loss (a phrase), or None: it
    needs a base model whose last hidden states go through a plain linear output layer (no bias,
    no scaling or capping of the logits) into transformers' causal-LM cross-entropy."""
    head = _head(model)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "its output layer is not a linear map without bias"
    base = getattr(model, "base_model", model)
    if base is model or not isinstance(base, nn.Module):
        return "it has no base model to take the last hidden states from"
    config = getattr(model, "config", None)
    for key in LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            return f"it {'caps' if 'softcap' in key else 'scales'} its logits (config.{key}={value})"
    if getattr(config, "output_router_logits", False):
        return "its loss adds a router loss (config.output_router_logits)"
    if getattr(model, "_loss_function", None) is not None or getattr(model, "loss_type", None) not in (
        None,
        "ForCausalLM",
    ):
        return f"its loss is not the causal-LM cross-entropy (loss_type {getattr(model, 'loss_type', None)})"
    return None


def _probe(model: nn.Module, stock: Callable) -> type | str:
    """Run the stock forward once on a few tokens, in eval mode: its logits must be the output
    layer over the base model's last hidden states, and its loss ours. Returns the model's own
    output class, or why the check failed. Draws no random numbers (the run's seed stays put)."""
    head = _head(model)
    ids = (torch.arange(1, 9) * 7919 % head.out_features).unsqueeze(0).to(head.weight.device)
    try:
        with eval_mode(model), torch.no_grad():
            out = stock(model, input_ids=ids, labels=ids, use_cache=False)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            logits = head(hidden).float()
            loss = linear_cross_entropy(hidden, head.weight, ids)
    except Exception as error:  # whatever a model's forward may raise: it keeps the stock loss
        return f"its forward could not be checked ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    stock_logits = getattr(out, "logits", None)
    if stock_logits is None or stock_logits.shape != logits.shape:
        return "its logits are not the output layer over the base model's hidden states"
    tolerance = 1e-3 * logits.abs().max().item() + 1e-5
    if (stock_logits.float() - logits).abs().max().item() > tolerance:
        return "its logits are not the output layer over the base model's hidden states"
    if getattr(out, "loss", None) is None or abs(out.loss.item() - loss.item()) > 1e-3 * abs(out.loss.item()) + 1e-5:
        return "its loss is not the causal-LM cross-entropy of its logits"
    return type(out)


def install(model: nn.Module, kernel: str = "hftextgen", evaluation: bool = False) -> str | None:
    """Route the model's training steps with labels through the fused loss (`kernel`:
    "hftextgen", this module's, or "liger"); with `evaluation`, its forward passes with labels in
    eval mode too (the Trainer's evaluation with prediction_loss_only keeps the loss alone, so
    the logits of a whole evaluation batch need not exist). Returns None once installed, else
    why not, as a phrase ("it caps its logits ..."). Patches this instance only, never the
    class; install before any wrapping (PEFT keeps calling the instance's forward)."""
    if kernel not in ("hftextgen", "liger"):
        raise ValueError(f"kernel must be hftextgen or liger, not {kernel!r}")
    if kernel == "liger" and (reason := liger_unavailable()):
        return reason
    if getattr(model, "_fused_loss", None) == kernel:
        return None
    reason = unsupported(model)
    if reason is not None:
        return reason
    stock = type(model).forward
    output = _probe(model, stock)
    if isinstance(output, str):
        return output
    fields = set(getattr(output, "__dataclass_fields__", ()))
    workspace = Workspace()

    @functools.wraps(stock)  # the signature Trainer inspects (labels, **kwargs) stays the stock one
    def forward(self, input_ids=None, *args, labels=None, **kwargs):
        fused = self.training or evaluation
        if labels is None or not fused or args or kwargs.get("use_cache") or kwargs.get("logits_to_keep"):
            return stock(self, input_ids, *args, labels=labels, **kwargs)
        loss_args = {
            key: kwargs.pop(key) for key in ("num_items_in_batch", "shift_labels", "ignore_index") if key in kwargs
        }
        body = self.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        weight = _head(self).weight
        if kernel == "liger":
            loss = liger_linear_cross_entropy(body.last_hidden_state, weight, labels, **loss_args)
        else:
            loss = linear_cross_entropy(body.last_hidden_state, weight, labels, workspace=workspace, **loss_args)
        extra = {key: getattr(body, key, None) for key in ("hidden_states", "attentions") if key in fields}
        return output(loss=loss, logits=None, **extra)

    model.forward = types.MethodType(forward, model)
    model._fused_loss = kernel
    return None


def setup(
    model: nn.Module, setting: bool | str, device: torch.device, evaluation: bool = False, rows: int | None = None
) -> str | None:
    """Apply train.fused_loss to a model that trains on `device`: True, hftextgen's fused loss;
    "auto", the same on a CPU when a micro-batch's `rows` (batch x block) hold more fp32 logits
    than CPU_FUSE_BYTES, where it keeps memory flat (and measured faster on an AMD EPYC:
    bench/RESULTS.md), else the stock loss; on a GPU the stock loss until bench/gpu.py says
    otherwise. "liger", liger-kernel's where it can run, else hftextgen's;
    False, the stock loss. Returns a line for the log when the setting could not be followed as
    given, else None. `evaluation`: see `install`."""
    if setting is False or (setting == "auto" and not (device.type == "cpu" and _large_logits(model, rows))):
        return None
    if setting not in (True, "auto", "liger"):
        raise ValueError(f"train.fused_loss must be true, false, auto or liger, not {setting!r}")
    note = None
    if setting == "liger":
        unavailable = liger_unavailable()
        if unavailable is None:
            reason = install(model, "liger", evaluation)
            if reason is None:
                return None
            return f"train.fused_loss=liger: this model keeps its stock loss: {reason}"
        note = f"train.fused_loss=liger: {unavailable}; hftextgen's fused loss is used instead"
    reason = install(model, evaluation=evaluation)
    if reason is not None:
        return f"train.fused_loss={str(setting).lower()}: this model keeps its stock loss: {reason}"
    return note
