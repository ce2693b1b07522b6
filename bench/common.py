"""What every benchmark shares: the machine description, the results table, the JSON file, and
running one configuration in a child process.

A benchmark script builds rows of (what, baseline, ours) and hands them to `report`, which
prints the table and writes the JSON (bench/results/<name>.json unless --out says otherwise)
together with the machine, the versions and the load average before and after. A new
benchmark (generation, evaluation) is one more bench/<name>.py of that shape: `parser()` for
--quick and --out, its baseline and ours measured in the same run (through `run_child` when
either sets anything process-wide), `report()` at the end, and a line in the Makefile's bench.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "hftextgen")


@dataclass
class Row:
    """One line of a table. `higher_is_better` decides which way the ratio is taken, so a ratio
    above 1 always means ours is faster."""

    what: str
    baseline: float | None
    ours: float | None
    unit: str
    higher_is_better: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if not self.baseline or not self.ours:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps/repeats, numbers not meaningful")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default bench/results/<name>.json)")
    return p


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def table(title: str, rows: list[Row]) -> str:
    head = ("what", "baseline", "ours", "ratio")
    body = [
        (
            r.what + (f" ({r.note})" if r.note else ""),
            fmt(r.baseline, r.unit),
            fmt(r.ours, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(4)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in body
    ]
    return "\n".join(lines)


def report(name: str, title: str, rows: list[Row], args: argparse.Namespace, load_before: list[float], **extra) -> dict:
    payload = {
        "benchmark": name,
        "quick": bool(getattr(args, "quick", False)),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load(),
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
        **extra,
    }
    print()
    print(table(title, rows))
    print(f"load average before {load_before}, after {payload['load_after']} on {payload['machine']['cores']} cores")
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"written {out}")
    return payload


def run_command(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> int | None:
    """Run a command from the repository root, bench/ importable; its exit code, or None if it
    ran past `timeout` seconds (then it and everything it started are killed).

    The command gets a session of its own, so that a timeout, or this process being stopped,
    ends its children too (data loader workers, compile workers, launched processes), which
    would otherwise hold memory and the GPU.
    """
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_child(module: str, config: dict, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `python -m <module> --child <config.json>` and return the JSON it writes.

    One process per configuration: process-wide settings (glibc mallopt, thread pools,
    torch.compile caches, CUDA state) must not leak from one measurement into the next.
    A failure is returned as {"error": ...} so one broken configuration costs only its row.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps({**config, "result": str(out_path)}))
        started = time.perf_counter()
        code = run_command([sys.executable, "-m", module, "--child", str(cfg_path)], timeout, env)
        wall = time.perf_counter() - started
        if code is None:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": wall}
        if code != 0 or not out_path.exists():
            return {"error": f"exit code {code}", "wall_s": wall}
        result = json.loads(out_path.read_text())
        result["wall_s"] = wall
        return result


def child_config(argv: list[str]) -> dict | None:
    """The config of a `--child FILE` invocation, else None."""
    if len(argv) == 2 and argv[0] == "--child":
        return json.loads(Path(argv[1]).read_text())
    return None


def write_child_result(config: dict, result: dict) -> None:
    Path(config["result"]).write_text(json.dumps(result))
