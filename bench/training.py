"""Training throughput, shared by bench/train_cpu.py and bench/gpu.py: one configuration per
child process, timed over steady-state optimizer steps.

Two kinds of configuration:
  plain  a stock transformers.Trainer with TrainingArguments at their defaults (output_dir,
         per_device_train_batch_size, report_to="none", and max_steps/save_strategy to bound
         the run), on the same GPT-2 architecture and the same packed blocks as ours.
  ours   `hftextgen finetune --config RECIPE [flags]`, the command users run, in-process.

A callback (added to transformers' default callbacks in the child, so neither path is edited)
notes the clock at the end of step `warmup` and of step `warmup + steps`, synchronising the GPU
at those two points only; tokens/s is steps x tokens per step over that interval. Warm-up
covers allocation, torch.compile and the first-step autotuning. The run stops right after the
last timed step: the saving and final evaluation that follow are not measured. The child also
reports its peak resident memory, and its kernel time and page faults per timed step.

Also recorded: the loss of every step (a copy kept on the device until the end, so that recording
it costs no sync; bench/gpu.py's loss check compares them), and the peak memory (GPU memory
allocated by torch on a GPU, else peak RSS). liger-kernel's loss is the recipe's own
`--train.fused_loss liger`.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time

from bench import common

# MFU's peak: dense bf16 of an H100/H200 SXM, the figure the numbers use.
PEAK_FLOPS = 989e12


class MeasurementDone(Exception):
    """Raised by the clock after the last timed step, to skip saving and evaluation."""


def flops_per_token(model, block_size: int) -> tuple[int, float]:
    """(N, 6N + 12*L*H*Q*T): N counts every parameter once (tied embeddings once) except the
    position embeddings."""
    seen, n = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        n += p.numel()
    from hftextgen.model import architecture

    cfg = architecture.shape(model.config)  # the common names, whatever the architecture
    layers, heads, head_dim = cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    return n, 6 * n + 12 * layers * heads * head_dim * block_size


def make_clock(warmup: int, steps: int, profile: bool = False):
    import torch
    from transformers import TrainerCallback

    on_gpu = torch.cuda.is_available()

    def now() -> float:
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.result = {"warmup_steps": warmup, "timed_steps": steps, "losses": []}
            self.begin = None
            self.step_times: list[float] = []

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            block = int(train_dataloader.dataset[0]["input_ids"].shape[-1])
            n, fpt = flops_per_token(model, block)
            self.result.update(
                block_size=block,
                tokens_per_step=block
                * args.per_device_train_batch_size
                * args.gradient_accumulation_steps
                * args.world_size,
                per_device_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                parameters_without_positions=n,
                flops_per_token=fpt,
                vocab_size=model.config.vocab_size,
                precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                optim=str(args.optim),
                torch_compile=bool(args.torch_compile),
                fused_loss=getattr(model, "_fused_loss", None) or "stock",
                device=str(args.device),
            )
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            self.begin = now()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.result["losses"].append([state.global_step, logs["loss"]])

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step == 1:
                self.result["first_step_s"] = now() - self.begin  # compile and warm-up show here
            if step == warmup:
                if profile:
                    self.profiler = start_profiler(on_gpu)
                self.start = self.last = now()
                self.cpu_start = time.process_time()
                self.usage_start = resource.getrusage(resource.RUSAGE_SELF)
            elif warmup < step <= warmup + steps and not on_gpu:
                # Per-step times (CPU only: on a GPU they would time the launch queue): their median
                # is the figure least moved by other processes on a shared machine.
                t = time.perf_counter()
                self.step_times.append(t - self.last)
                self.last = t
            if step == warmup + steps:
                elapsed = now() - self.start
                r = self.result
                r["timed_s"] = elapsed
                # CPU seconds of this process (all its threads): what the steps cost in work, which
                # other processes on a shared machine stretch far less than they stretch wall time.
                r["cpu_s"] = time.process_time() - self.cpu_start
                r["tokens_per_cpu_s"] = steps * r["tokens_per_step"] / r["cpu_s"]
                # Kernel time and page faults per step: what allocating large tensors anew costs.
                usage = resource.getrusage(resource.RUSAGE_SELF)
                r["system_s_per_step"] = (usage.ru_stime - self.usage_start.ru_stime) / steps
                r["user_s_per_step"] = (usage.ru_utime - self.usage_start.ru_utime) / steps
                r["minor_faults_per_step"] = (usage.ru_minflt - self.usage_start.ru_minflt) / steps
                r["tokens_per_s"] = steps * r["tokens_per_step"] / elapsed
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / PEAK_FLOPS
                if self.step_times:
                    r["step_times_s"] = self.step_times
                    r["tokens_per_s_median_step"] = r["tokens_per_step"] / statistics.median(self.step_times)
                r["peak_memory_bytes"], r["peak_memory"] = peak_memory()
                if profile:
                    r["profile"] = stop_profiler(self.profiler, on_gpu, elapsed, steps)
                raise MeasurementDone

    return StepClock()


def start_profiler(on_gpu: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def stop_profiler(profiler, on_gpu: bool, elapsed: float, steps: int) -> dict:
    """Where the timed steps' time went: the top operators by their own device time (CPU time on
    a CPU), and how busy the device was (its kernels' time over the wall time: what is left is
    launch overhead and waiting on the host). The profiler slows the steps it watches, so a
    profiled row's tokens/s is not a speed."""
    from torch.autograd import DeviceType

    profiler.__exit__(None, None, None)
    events = profiler.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # A kernel's time shows twice, as the kernel and as its operator's own device time: the busy
    # time counts the kernels, the top list the operators.
    device = DeviceType.CUDA if on_gpu else DeviceType.CPU
    busy_s = sum(getattr(e, key) for e in events if e.device_type == device) / 1e6
    top = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: getattr(e, key), reverse=True)
    top = top[:25]
    return {
        "device_busy_s_per_step": busy_s / steps,
        "wall_s_per_step": elapsed / steps,
        "busy_fraction": busy_s / elapsed,
        "top": [{"name": e.key, "calls": e.count, "s_per_step": getattr(e, key) / 1e6 / steps} for e in top],
        "table": events.table(sort_by=key, row_limit=25, max_name_column_width=60),
    }


def peak_memory() -> tuple[int, str]:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "GPU, torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU, peak RSS of the process"


def record_step_losses() -> list:
    """Every training step's loss, as the Trainer returns it from training_step (detached, on the
    device: no sync per step), copied into tensors of BLOCK losses each. Returns the list of
    [tensor, losses in it] it fills.

    Not a tensor per step: a small tensor kept each step lands among the blocks glibc reuses from
    step to step and keeps them from merging, so the heap grew ~25 MB a step under hftextgen's
    fused loss on a CPU (tiny-gpt2.yaml: flat at 1.18 GB without, 2.5 GB at step 80 with a clone
    kept a step; bench/RESULTS.md): that measured the harness, not the run."""
    import torch
    import transformers

    kept: list = []
    stock = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        loss = stock(self, *args, **kwargs)
        if not kept or kept[-1][1] == BLOCK:
            kept.append([torch.full((BLOCK,), float("nan"), device=loss.device), 0])
        # A copy: under CUDA graphs (torch_compile_mode reduce-overhead) the step's output lives
        # in the graph's memory, which the next replay overwrites.
        kept[-1][0][kept[-1][1]].copy_(loss.detach())
        kept[-1][1] += 1
        return loss

    transformers.Trainer.training_step = training_step
    return kept


BLOCK = 4096


def run(config: dict) -> dict:
    """Child side: run one configuration and return its measurements."""
    import transformers.trainer

    clock = make_clock(config["warmup"], config["steps"], config.get("profile", False))
    transformers.trainer.DEFAULT_CALLBACKS.append(clock)
    losses = record_step_losses()
    started = time.perf_counter()
    try:
        if config["kind"] == "plain":
            _plain(config)
        else:
            _ours(config)
    except MeasurementDone:
        pass
    clock.result["child_wall_s"] = time.perf_counter() - started
    clock.result["step_losses"] = [x for buffer, n in losses for x in buffer[:n].tolist()]
    # The process's peak resident memory (Linux reports KiB): data preparation, model, and the
    # training steps; the run stops before saving and evaluating.
    clock.result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if "tokens_per_s" not in clock.result:
        raise SystemExit("the run ended before the last timed step")
    return clock.result


def _ours(config: dict) -> None:
    from hftextgen import cli

    steps = config["warmup"] + config["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = ["--model.name_or_path", _pretrained(config["pretrained"], tmp)] if "pretrained" in config else []
        code = cli.main(
            [
                "finetune",
                "--config",
                config["recipe"],
                *pretrained,
                *config.get("flags", []),
                "--train.max_steps",
                str(steps),
                "--train.output_dir",
                f"{tmp}/run",
                "--train.eval_strategy",
                "no",
                "--train.save_strategy",
                "no",
                "--train.load_best_model_at_end",
                "false",
                "--train.disable_tqdm",
                "true",
                "--data.cache_dir",
                config["cache_dir"],
            ]
        )
    if code:
        raise SystemExit(f"hftextgen finetune exited with {code}")


def _pretrained(shape: dict, folder: str) -> str:
    """A GPT-2 checkpoint of this shape saved as a hub model is (random weights: the hub is
    offline here), with the bundled GPT-2 tokenizer: what a LoRA row fine-tunes."""
    from transformers import AutoModelForCausalLM, GPT2Config, set_seed

    from hftextgen.model import tokenizer

    tok = tokenizer.bundled_gpt2()
    set_seed(0)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
    model = AutoModelForCausalLM.from_config(GPT2Config(**shape, vocab_size=len(tok), **ids))
    path = f"{folder}/pretrained"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _plain(config: dict) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments, set_seed

    from hftextgen import data
    from hftextgen.data import DataConfig
    from hftextgen.data.packing import collate_blocks
    from hftextgen.model import tokenizer

    block = config["block_size"]
    tok = tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")
    packed = data.prepare(
        data.Corpus(DataConfig(source="shakespeare", block_size=block, cache_dir=config["cache_dir"])),
        tok,
        tokenizer.fingerprint(tok),
    )
    set_seed(42)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(
            **config["model"],
            n_positions=block,
            vocab_size=config["model"].get("vocab_size") or len(tok),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=config["batch_size"],
            report_to="none",
            max_steps=config["warmup"] + config["steps"],
            save_strategy="no",
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=packed.train, data_collator=collate_blocks).train()


def main(argv: list[str]) -> None:
    config = common.child_config(argv)
    if config is None:
        raise SystemExit("bench.training is run by bench/train_cpu.py and bench/gpu.py (--child CONFIG)")
    if config["kind"] == "ours":
        from hftextgen import runtime

        runtime.wait_briefly()  # what the command does before torch loads; the plain Trainer keeps libgomp's
    common.write_child_result(config, run(config))


if __name__ == "__main__":
    main(sys.argv[1:])
