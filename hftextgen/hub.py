"""Reaching the Hugging Face Hub, or saying plainly that it cannot be reached.

Left alone, transformers retries an unreachable hub for ~50 s and then prints a generic message.
We probe the endpoint once, through huggingface_hub's own HTTP session (so proxies,
HF_HUB_OFFLINE and HF_ENDPOINT apply as they do to downloads) with a short timeout, use the
local HF cache when the hub is away, and otherwise stop with one line that says what to do
instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

from .errors import UserError

T = TypeVar("T")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, is the hub
    except Exception:  # no answer: the transport's error types differ between huggingface_hub releases
        return False
    return True


def looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep * 2 in name or name.count("/") > 1


def load_from_hub(load: Callable[..., T], name: str, what: str, key: str, /, **kwargs) -> T:
    """``load(name, **kwargs)`` for a hub name, via the local cache when the hub is unreachable.

    `what` names the thing for messages ("model", "tokenizer", "dataset"); `key` is the recipe key
    that holds `name`, so the error can say which setting to change.
    """
    if os.path.isdir(name):
        return load(name, **kwargs)
    if looks_like_local_path(name):
        raise UserError(f"{key}: no such directory: {name}")
    if not hub_reachable():
        try:
            return load(name, local_files_only=True, **kwargs)
        except (OSError, ValueError):  # not in the local cache; a TypeError would be our bug
            instead = (
                "save its splits as .jsonl or .parquet files where there is internet and read them with "
                "data.source=files"
                if what == "dataset"
                else f"save_pretrained it where there is internet and set {key} to that directory"
            )
            raise UserError(
                f"{key}: the {what} {name!r} is not a local directory and the Hugging Face Hub cannot be "
                f"reached (no network, or HF_HUB_OFFLINE=1): {instead}"
            ) from None
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as exc:  # the hub answered, but not with this repo
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{key}: could not load the {what} {name!r} from the Hugging Face Hub: {reason}") from exc


def check_push(args) -> None:
    """train.push_to_hub: fail before any work, not after hours of training, when the upload
    could not happen."""
    if not args.push_to_hub:
        return
    if not hub_reachable():
        raise UserError(
            "train.push_to_hub: the Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE=1): run where "
            "it can be reached, or drop train.push_to_hub and upload the run directory later with "
            "`hf upload <user>/<name> <run directory>`"
        )
    from huggingface_hub import HfApi, get_token

    token = args.hub_token or get_token()
    if not token:
        raise UserError(
            "train.push_to_hub needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN "
            "(or train.hub_token)"
        )
    try:
        HfApi().whoami(token=token)
    except Exception as exc:  # HfHubHTTPError (401: a revoked or mistyped token), or the network went away
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"train.push_to_hub: the Hugging Face Hub does not accept this token ({reason}): run `hf auth login` "
            f"with a token that has write access, or set HF_TOKEN (or train.hub_token)"
        ) from None


def push_run(trainer, output_dir) -> str:
    """The final upload of a run directory, model card and plot included, to the repo the Trainer
    created (train.hub_model_id, or the run directory's name). Trainer.push_to_hub would write
    its own README.md over the model card first, so this uploads the folder as it stands, with
    the same exclusions (checkpoints are pushed by train.hub_strategy, not here)."""
    from transformers.utils import hub as hf_hub_utils

    pending = getattr(trainer, "push_in_progress", None)
    if pending is not None and not pending.is_done():
        pending.wait_until_done()  # a checkpoint upload of train.hub_strategy still running
    args = trainer.args
    hf_hub_utils.hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        token=args.hub_token,
        ignore_patterns=["_*", "checkpoint-*"],
        revision=args.hub_revision,
    )
    return trainer.hub_model_id
