"""Process-wide settings a command makes once, before its work: how OpenMP threads wait, memory
reuse, what replicas print, and the warnings that do not apply to packed language-model data; a
model put for a while in eval mode as its saved files load (eval_mode); and every decision about
the hardware: the device, bf16 or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import warnings

# libgomp's idle threads spin this many times before they sleep (its own default: 300,000). On a
# shared CPU a thread that spins waiting for its partner keeps a core from it: with another
# process on one of two cores the default recipe's step took 0.2-4.6 s instead of 50 ms; with
# 1,000 spins 0.13-0.6 s, and alone the same 50-58 ms within noise (AMD EPYC, bench/RESULTS.md).
# The thread count, and so every number, stays as it was.
SPIN_COUNT = "1000"


def wait_briefly() -> None:
    """OpenMP threads that wait sleep after a short spin (GOMP_SPINCOUNT), unless the user set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT. Only before torch is imported: libgomp reads them when it
    loads."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def reuse_freed_memory() -> None:
    """Keep freed memory in the process (glibc only) instead of returning it to the OS.

    Every step allocates the logits anew: batch x block x vocab floats, ~100 MB and more for
    GPT-2's 50k vocabulary. glibc serves such sizes with fresh mmaps and unmaps them on free, so
    each step pays page faults on hundreds of MB; on a 2-core CPU that made training 2.5x slower.
    Turning off mmap for large blocks and trimming keeps the memory for reuse.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def quiet_replica(args) -> None:
    """Under several processes every one runs the same code, so whatever a replica would print
    the first process prints too: replicas keep errors only (train.log_level_replica, `error` by
    default), without progress bars."""
    import datasets
    import transformers

    level = args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    if level > logging.WARNING:
        warnings.simplefilter("ignore")
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


class _NoPaddingWarning(logging.Filter):
    """transformers warns that input starting or ending with the pad id may be padded and wants
    an attention mask. Our pad id is EOS, which starts and ends documents inside packed blocks;
    they are never padded, and a mask of ones would only slow every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask` since your input_ids may be padded" not in record.getMessage()


def ignore_padding_warning() -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _NoPaddingWarning) for f in logger.filters):
        logger.addFilter(_NoPaddingWarning())


@contextlib.contextmanager
def eval_mode(model):
    """The model as its saved files load, inside the block: in eval mode, and running its own
    forward, not the wrapper that accelerate puts on the instance for mixed-precision training
    (bf16 autocast around every call, kept after training ends: the end-of-training evaluation
    then scored in bf16 what `hftextgen evaluate` scores in fp32, perplexity 59.048 against
    59.041). Both are back as they were after the block."""
    was_training = model.training
    own = model.__dict__.get("_original_forward")  # accelerate's record of the forward it wrapped
    wrapped = model.__dict__.get("forward")
    swap = own is not None and wrapped is not None and wrapped is not own
    model.eval()
    if swap:
        model.forward = own
    try:
        yield model
    finally:
        if swap:
            model.forward = wrapped
        model.train(was_training)


# ---------------------------------------------------------------- device and precision


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.split(":", 1)[1].strip() if ":" in line else platform.processor() or platform.machine()


@functools.cache
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def bf16_is_native() -> bool:
    """bf16 mixed precision pays off: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return _cpu_has_native_bf16()


def settle_training_device(args) -> None:
    """The hardware's part of TrainingArguments `args`, before they are checked: bf16 unset is on
    where the hardware runs it natively (never with fp16); without an accelerator, use_cpu
    (TrainingArguments refuses bf16 without a GPU unless it is set, and without it processes
    started by torchrun, accelerate's multi-GPU launcher, each train alone instead of joining
    one gloo process group) and no pinned memory (it only helps copies to an accelerator; torch
    warns on every loader)."""
    import torch

    # Left to the hardware: on a CPU, train/precision.py may still pick fp32 by timing the step.
    args.bf16_from_hardware = args.bf16 is None
    if args.bf16 is None:
        args.bf16 = not args.fp16 and bf16_is_native()
    if not torch.accelerator.is_available():
        args.use_cpu = True
        args.dataloader_pin_memory = False


def default_device():
    """Where generate and evaluate load a model when --device is unset: a GPU if there is one."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_scoring(device) -> bool:
    """evaluate.bf16's default: bf16 autocast on CUDA GPUs with bf16, fp32 elsewhere (on a CPU
    bf16 would change the scores for little speed)."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()
