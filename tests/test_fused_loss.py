"""The fused loss computes each architecture's own loss and gradients; models that change their
logits (or their loss) keep theirs; train.fused_loss's settings, liger-kernel's path included.
No timings here: bench/train_cpu.py measures speed and memory."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

from hftextgen.train import fused_loss

VOCAB = 1000
LLAMA_LIKE = {
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
SHAPES = {
    "gpt2": {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "n_positions": 32,
        "resid_pdrop": 0,
        "embd_pdrop": 0,
        "attn_pdrop": 0,
    },
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gpt_neox": {k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"},
}


def tiny(model_type: str = "gpt2", seed: int = 0, **overrides) -> nn.Module:
    shape = SHAPES.get(model_type, LLAMA_LIKE)
    config = AutoConfig.for_model(
        model_type, **{"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, **shape, **overrides}
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))
    labels = x.clone()
    labels[0, :5] = -100  # masked targets count neither in the loss nor in its normaliser
    return x, labels


def losses_and_gradients(stock: nn.Module, fused: nn.Module, bf16: bool, **loss_kwargs) -> tuple[list, float]:
    """Both models' loss on the same batch, and the largest gradient difference relative to each
    parameter's largest gradient."""
    x, labels = batch()
    losses = []
    for model in (stock, fused):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=labels, **loss_kwargs).loss
        (loss * 3).backward()  # a gradient other than 1 flows into the loss
        losses.append(loss.item())
    errors = [
        ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item()
        for p, q in zip(stock.parameters(), fused.parameters(), strict=True)
        if p.grad is not None
    ]
    return losses, max(errors)


# Tolerances, relative to each gradient's largest element: the loss is the same fp32 arithmetic,
# to rounding, and so are fp32 gradients. In bf16 the softmax is rounded to bf16 before the rows'
# weights are applied (the stock path rounds the weighted difference) and each chunk's share of
# the output matrix's gradient is rounded before the shares are summed; those differences of
# bf16's epsilon (2^-7) compound through the layers below: four epsilons.
GRAD_TOLERANCE = {False: 1e-5, True: 4 * 2**-7}


@pytest.mark.parametrize("model_type", list(SHAPES))
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunks", ["uneven", "one"])
def test_fused_loss_matches_each_architectures_loss_and_gradients(model_type, bf16, chunks, monkeypatch):
    if chunks == "uneven":
        monkeypatch.setattr(fused_loss, "chunk_rows", lambda *args: 7)  # 128 rows: 18 chunks of 7, then 2
    stock = tiny(model_type)
    fused = copy.deepcopy(stock)
    assert fused_loss.install(fused) is None
    losses, error = losses_and_gradients(stock, fused, bf16)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert error <= GRAD_TOLERANCE[bf16]


@pytest.mark.slow  # compiles a model (~20 s on a 2-core CPU)
@pytest.mark.extended
def test_the_fused_loss_runs_outside_compiled_graphs(monkeypatch):
    """Under train.torch_compile the fused loss runs eagerly, as checked above: compiled on an
    H200 its backward gave zero gradients (the model trained nothing). Dynamo traces a function
    with fake tensors, so the loss's forward must only ever see real ones."""
    seen = []
    forward = fused_loss._LinearCrossEntropy.forward

    def recording(ctx, hidden, *args):
        seen.append(isinstance(hidden, torch._subclasses.FakeTensor))
        return forward(ctx, hidden, *args)

    monkeypatch.setattr(fused_loss._LinearCrossEntropy, "forward", staticmethod(recording))
    monkeypatch.setattr(fused_loss, "chunk_rows", lambda *args: 7)  # several chunks, as on the GPU
    stock = tiny()
    fused = copy.deepcopy(stock)
    assert fused_loss.install(fused) is None
    compiled = torch.compile(fused, backend="aot_eager")  # dynamo and autograd tracing, no C++ build
    torch._dynamo.reset()
    losses, error = losses_and_gradients(stock, compiled, bf16=True)
    assert seen and not any(seen)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert error <= GRAD_TOLERANCE[True]


@pytest.mark.parametrize("how", ["num_items_in_batch", "shift_labels"])
def test_fused_loss_takes_the_loss_arguments_trainer_and_context_parallelism_pass(how):
    stock = tiny("llama")
    fused = copy.deepcopy(stock)
    assert fused_loss.install(fused) is None
    x, labels = batch()
    if how == "num_items_in_batch":  # gradient accumulation: a sum divided by the whole batch's count
        kwargs = {"num_items_in_batch": torch.tensor(300)}
    else:  # labels shifted by the caller; the model must not shift them again
        kwargs = {"shift_labels": torch.roll(labels, -1, dims=1)}
    losses, error = losses_and_gradients(stock, fused, bf16=False, **kwargs)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert error <= GRAD_TOLERANCE[False]


def test_fused_loss_at_gpt2s_vocabulary_in_default_chunks():
    """50257 columns and the chunking chunk_rows picks, as training runs it."""
    stock = tiny("gpt2", vocab_size=50257)
    fused = copy.deepcopy(stock)
    assert fused_loss.install(fused) is None
    losses, error = losses_and_gradients(stock, fused, bf16=True)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert error <= GRAD_TOLERANCE[True]


def test_chunks_follow_the_byte_budget_evenly():
    cpu = torch.device("cpu")
    most = fused_loss.CPU_CHUNK_BYTES // (50257 * 6)  # bf16 logits and their fp32 copy
    for n in (1, most, most + 1, 4096, 10**5):
        rows = fused_loss.chunk_rows(n, 50257, cpu, torch.bfloat16)
        chunks = -(-n // rows)
        assert rows <= most and chunks == -(-n // most)  # no more chunks than the budget needs
        assert n - (chunks - 1) * rows > rows - chunks  # the last chunk is about as large as the others
    assert fused_loss.chunk_rows(4096, 50257, cpu, torch.float32) <= fused_loss.CPU_CHUNK_BYTES // (50257 * 4)
    assert fused_loss.chunk_rows(10, 10**9, cpu) == 1


def test_the_workspace_is_reused_from_step_to_step():
    """The chunk buffers are allocated once (fresh ones cost page faults every step on a CPU)."""
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    hidden = torch.randn(4, 32, 16, requires_grad=True)
    workspace = fused_loss.Workspace()
    pointers = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_loss.linear_cross_entropy(hidden, weight, batch()[1], rows=50, workspace=workspace)
        loss.backward()
        pointers.append({name: t.data_ptr() for name, t in workspace.buffers.items()})
    assert pointers[0] == pointers[1] and set(pointers[0]) == {"logits", "probs", "grad_w"}
    assert workspace.buffers["logits"].numel() == 50 * VOCAB  # the largest chunk, no more


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_fused_loss_leaves_evaluation_and_generation_stock(model_type):
    model = tiny(model_type)
    fused_loss.install(model)
    x = torch.randint(0, VOCAB, (2, 8))
    model.eval()
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, 8, VOCAB) and out.loss is not None
    generated = model.generate(x[:, :3], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 5)
    model.train()
    out = model(input_ids=x, labels=x)
    assert out.logits is None and out.loss is not None


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_evaluation_with_labels_can_keep_the_loss_alone(model_type):
    """evaluation=True (the Trainer's evaluation keeps only the loss): eval-mode passes with
    labels give the stock loss without logits; passes without labels stay stock."""
    stock, fused = tiny(model_type), tiny(model_type)
    fused_loss.install(fused, evaluation=True)
    x = torch.randint(0, VOCAB, (2, 8))
    stock.eval(), fused.eval()
    with torch.no_grad():
        expected, got = stock(input_ids=x, labels=x), fused(input_ids=x, labels=x)
        assert got.logits is None and got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
        assert torch.equal(fused(input_ids=x).logits, stock(input_ids=x).logits)


def test_fused_output_is_the_models_own_output_class():
    for model_type, name in (("gpt2", "CausalLMOutputWithCrossAttentions"), ("llama", "CausalLMOutputWithPast")):
        model = tiny(model_type)
        fused_loss.install(model)
        x = torch.randint(0, VOCAB, (2, 8))
        assert type(model(input_ids=x, labels=x)).__name__ == name


def test_installing_draws_no_random_numbers():
    """The check install runs must not move the run's seed (the default recipe's results)."""
    model = tiny("llama")
    state = torch.get_rng_state()
    fused_loss.install(model)
    assert torch.equal(state, torch.get_rng_state())


class LogitsDoubled(GPT2LMHeadModel):
    """A model that changes its logits in code, with no config field to say so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def biased_head():
    model = tiny("gpt2")
    model.lm_head = nn.Linear(16, VOCAB, bias=True)
    model.config.tie_word_embeddings = False
    return model


UNSUPPORTED = {
    "gemma2 (soft-capped logits)": (lambda: tiny("gemma2", head_dim=8), "caps its logits"),
    "cohere (scaled logits)": (lambda: tiny("cohere"), "scales its logits (config.logit_scale=0.0625)"),
    "granite (scaled logits)": (lambda: tiny("granite", logits_scaling=8.0), "scales its logits"),
    "mixtral (router loss)": (
        lambda: tiny("mixtral", num_local_experts=2, num_experts_per_tok=1, output_router_logits=True),
        "router loss",
    ),
    "a head with a bias": (biased_head, "not a linear map without bias"),
    "logits changed in code": (
        lambda: LogitsDoubled(AutoConfig.for_model("gpt2", vocab_size=VOCAB, **SHAPES["gpt2"])),
        "logits are not the output layer",
    ),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_models_that_change_their_logits_keep_their_own_loss(name):
    build, why = UNSUPPORTED[name]
    model = build()
    reason = fused_loss.install(model)
    assert reason is not None and why in reason
    assert "forward" not in vars(model)
    note = fused_loss.setup(model, "auto", torch.device("cpu"))
    assert note.startswith("train.fused_loss=auto: this model keeps its stock loss: ") and "\n" not in note


def test_setup_follows_the_setting():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    vocab = tiny("qwen2").get_output_embeddings().weight.shape[0]
    one_chunk = fused_loss.CPU_FUSE_BYTES // (4 * vocab)  # rows whose fp32 logits fill the threshold
    for setting, device, rows, installed in (
        (False, cpu, None, None),
        ("auto", gpu, None, None),
        ("auto", cpu, None, "hftextgen"),
        ("auto", cpu, one_chunk + 1, "hftextgen"),  # large logits: fused
        ("auto", cpu, one_chunk, None),  # small ones: the stock loss
        (True, cpu, 8, "hftextgen"),
        (True, gpu, None, "hftextgen"),
    ):
        model = tiny("qwen2")
        assert fused_loss.setup(model, setting, device, rows=rows) is None
        assert getattr(model, "_fused_loss", None) == installed, (setting, device, rows)
    with pytest.raises(ValueError, match="true, false, auto or liger"):
        fused_loss.setup(tiny(), "sometimes", cpu)


def test_liger_without_liger_kernel_says_so_and_uses_ours(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails, installed or not
    model = tiny("llama")
    note = fused_loss.setup(model, "liger", torch.device("cpu"))
    assert "pip install liger-kernel" in note and "hftextgen's fused loss is used instead" in note
    assert model._fused_loss == "hftextgen"


def test_liger_path_computes_the_stock_loss(monkeypatch):
    """liger-kernel's function stood in for by plain torch (its kernels need a CUDA GPU): what
    this module hands it (flat hidden states, shifted targets, sum then normaliser) must give the
    model's own loss and gradients."""
    calls = []

    def liger_fused_linear_cross_entropy(input, weight, target, ignore_index=-100, reduction="mean"):
        calls.append(reduction)
        logits = (input @ weight.T).float()
        return nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    for name, module in (
        ("liger_kernel", types.ModuleType("liger_kernel")),
        ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
        ("liger_kernel.transformers.functional", functional),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    stock = tiny("qwen2")
    fused = copy.deepcopy(stock)
    assert fused_loss.setup(fused, "liger", torch.device("cpu")) is None
    assert fused._fused_loss == "liger"
    losses, error = losses_and_gradients(stock, fused, bf16=False, num_items_in_batch=torch.tensor(300))
    assert calls == ["sum"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert error <= GRAD_TOLERANCE[False]
