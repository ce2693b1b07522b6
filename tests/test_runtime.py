"""Process-wide settings of a command: how OpenMP threads wait."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os, sys; from hftextgen import cli; cli.main(['--version']); print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize(
    "given, seen", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "active"}, "None")]
)
def test_the_command_makes_waiting_threads_sleep_soon_unless_told_otherwise(given, seen):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | given
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == seen


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401

    from hftextgen import runtime

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    runtime.wait_briefly()
    assert "GOMP_SPINCOUNT" not in os.environ
