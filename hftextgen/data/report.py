"""The data report as people read it: a table of each split's counts (a mixture's: each source's
table, then what the draw took of each), the sentence that says how the items are packed, and
what the held-out evaluation covers. The numbers come from the prepared data (prepared.py,
mixture.py); finetune, prepare, validate and the model card print them from here.
"""

from __future__ import annotations

from .config import ITEMS
from .shards import SPLITS


def _unit(report: dict) -> str:
    return ITEMS[report.get("packing", "concat")]


def _columns(report: dict) -> list[tuple[str, object]]:
    """(heading, value of a split's report) for each column of the data report's table."""
    task, unit = report.get("task"), _unit(report)
    columns: list[tuple[str, object]] = []
    if task and task["format"] == "preference":
        columns += [
            ("pairs", lambda r: r["examples"]["examples"]),
            ("prompt cut", lambda r: r["examples"]["truncated"]),
            ("too long", lambda r: r["examples"]["dropped_too_long"]),
            ("unmaskable", lambda r: r["examples"].get("skipped_unmaskable", 0)),
            ("trained", "trained_tokens"),
        ]
    elif task:
        columns += [
            ("examples", lambda r: r["examples"]["examples"]),
            ("turns dropped", lambda r: r["examples"].get("exchanges_dropped", 0)),
            ("turn cut", lambda r: r["examples"].get("turn_cut", 0)),
            ("too long", lambda r: r["examples"]["dropped_too_long"]),
            ("no answer", lambda r: r["examples"]["skipped_no_assistant"]),
            ("unmaskable", lambda r: r["examples"].get("skipped_unmaskable", 0)),
            ("trained", "trained_tokens"),
        ]
    else:
        columns += [("documents", "documents"), ("characters", "characters")]
    columns += [("tokens", "tokens")] + ([] if task and unit in ("examples", "pairs") else [(unit, unit)])
    if unit == "blocks":
        columns.append(("dropped", "tokens_dropped"))
    return columns


def report_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The data report's table: its heading and a row per split, numbers formatted (a mixture's:
    a row per source)."""
    if "mixture" in report:
        return mixture_table(report)
    columns = _columns(report)
    head = ("split", *(name for name, _ in columns))
    value = lambda r, k: k(r) if callable(k) else r.get(k)  # noqa: E731
    rows = [
        (s, *(f"{value(report[s], k):,}" if value(report[s], k) is not None else "-" for _, k in columns))
        for s in SPLITS
    ]
    return head, rows


def describe_report(report: dict) -> str:
    """The data report as a table whose columns fit their numbers, at any size."""
    if "mixture" in report:
        return describe_mixture(report)
    lines = aligned(*report_table(report))
    lines.append(packing_line(report))
    ev = report.get("eval")
    if ev:
        unit = _unit(report)
        whole = ev["tokens"] == report["validation"]["tokens"] or ev["blocks"] == report["validation"].get("blocks")
        lines.append(
            f"held-out evaluation: {'all' if whole else 'a seeded subset of'} {ev['blocks']:,} {unit} "
            f"({ev['tokens']:,} tokens; data.max_eval_tokens={ev['max_tokens']:,})"
        )
    return "\n".join(lines)


def aligned(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A table's lines, each column as wide as its widest cell: the first to the left, numbers
    to the right."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in (head, *rows)
    ]


def packing_line(report: dict) -> str:
    """One sentence: how the examples are packed (and, for task data, the format and loss)."""
    packing, size, task = report.get("packing", "concat"), report["block_size"], report.get("task")
    what = f"data.format {task['format']}, loss on {task['loss_on']}; " if task else ""
    if packing == "concat":
        return f"{what}blocks of {size} tokens; EOS after each document: {report['add_eos']}"
    if packing == "pairs":
        return (
            f"{what}pairs: the prompt with each answer, packed into rows of at most {size} tokens, each sequence "
            "attending only to itself"
        )
    if packing == "isolated":
        return f"{what}packing isolated: rows of at most {size} tokens, each example attending only to itself"
    return f"{what}packing padded: one example a row (at most {size} tokens), batches grouped by length"


def mixture_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """A row per source: its weight and share, its training items, those drawn, how many times
    it is repeated (below 1: the part of it drawn), the tokens drawn, and its held-out tokens in
    the Trainer's evaluations."""
    table = report["mixture"]
    unit = table[0]["unit"]
    total = sum(r["weight"] for r in table)
    head = ("source", "format", "weight", "share", unit, "drawn", "repeat", "tokens drawn", "eval tokens")
    rows = [
        (
            r["source"],
            r["format"],
            f"{r['weight']:g}",
            f"{r['weight'] / total:.0%}",
            f"{r['available']:,}",
            f"{r['drawn']:,}",
            f"{r['repeat']:.2f}x",
            f"{r['tokens_drawn']:,}",
            f"{r['eval_tokens']:,}",
        )
        for r in table
    ]
    return head, rows


def describe_mixture(report: dict) -> str:
    """Each source's own table (as prepared), then the mixture: what was drawn from each, how
    the items are packed, and what is evaluated."""
    lines = []
    for row, own in zip(report["mixture"], report["sources"], strict=True):
        lines += [f"data.mixture{row['source']} ({row['format']}, at {row['cache']}):"]
        lines += ["  " + line for line in aligned(*report_table(own))]
    lines += ["mixture (an epoch; the same draw every epoch, data.split_seed):"]
    lines += ["  " + line for line in aligned(*mixture_table(report))]
    lines.append(packing_line(report))
    ev, unit = report["eval"], _unit(report)
    lines.append(
        f"held-out evaluation: {ev['blocks']:,} {unit} ({ev['tokens']:,} tokens) from every source, "
        f"data.max_eval_tokens={ev['max_tokens']:,} split by weight"
    )
    lines.append(f"evaluator at the end of training: {report['evaluator']}")
    return "\n".join(lines)
