"""The prepare report: documents and bytes kept/dropped per rule, PII counts, timings.

`Report.to_dict()` is written to `report.json` (and into the manifest); `format_table(report)`
renders it as a rich table for the terminal.
"""

from __future__ import annotations

import io

PII_KINDS = ("email", "ip", "phone")


class Report:
    """Counters filled by `ember.data.pipeline.prepare`."""

    def __init__(self):
        self.input = {"files": 0, "docs": 0, "bytes": 0, "bad_utf8_docs": 0, "bad_utf8_chars": 0, "bad_lines": 0}
        self.dropped: dict[str, dict[str, int]] = {}
        self.kept = {"docs": 0, "bytes": 0, "clean_bytes": 0}
        self.pii = dict.fromkeys(PII_KINDS, 0)
        self.seconds: dict[str, float] = {}

    def drop(self, reason: str, nbytes: int) -> None:
        d = self.dropped.setdefault(reason, {"docs": 0, "bytes": 0})
        d["docs"] += 1
        d["bytes"] += nbytes

    def keep(self, nbytes: int, clean_bytes: int, pii: dict[str, int]) -> None:
        self.kept["docs"] += 1
        self.kept["bytes"] += nbytes
        self.kept["clean_bytes"] += clean_bytes
        for k in PII_KINDS:
            self.pii[k] += pii.get(k, 0)

    def read_stats(self, stats) -> None:
        for k in self.input:
            self.input[k] = getattr(stats, k)

    def timing(self, **seconds: float) -> None:
        self.seconds.update({k: round(v, 3) for k, v in seconds.items()})

    def drop_summary(self) -> str:
        return ", ".join(f"{k}: {v['docs']}" for k, v in sorted(self.dropped.items())) or "none"

    def to_dict(self) -> dict:
        total = sum(self.seconds.values())
        return {"input": dict(self.input), "kept": dict(self.kept),
                "dropped": {k: self.dropped[k] for k in sorted(self.dropped)}, "pii": dict(self.pii),
                "seconds": dict(self.seconds),
                "mb_per_s": round(self.input["bytes"] / 1e6 / total, 3) if total else None}


def format_table(report: dict) -> str:
    """A rich table (as text) of documents and bytes per outcome, then PII and input counters."""
    from rich.console import Console
    from rich.table import Table

    docs, nbytes = max(1, report["input"]["docs"]), max(1, report["input"]["bytes"])
    table = Table(title="ember data prepare", show_lines=False)
    for col in ("outcome", "docs", "% docs", "bytes", "% bytes"):
        table.add_column(col, justify="left" if col == "outcome" else "right")

    def row(name: str, d: int, b: int) -> None:
        table.add_row(name, f"{d:,}", f"{100 * d / docs:.2f}", f"{b:,}", f"{100 * b / nbytes:.2f}")

    row("input", report["input"]["docs"], report["input"]["bytes"])
    for rule, v in report["dropped"].items():
        row(f"dropped: {rule}", v["docs"], v["bytes"])
    row("kept", report["kept"]["docs"], report["kept"]["bytes"])
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=False)
    console.print(table)
    inp = report["input"]
    console.print(f"PII replaced: {report['pii']['email']} e-mail, {report['pii']['ip']} IP, "
                  f"{report['pii']['phone']} phone")
    console.print(f"invalid UTF-8: {inp['bad_utf8_chars']} chars in {inp['bad_utf8_docs']} docs; "
                  f"bad JSONL lines skipped: {inp['bad_lines']}")
    if report.get("mb_per_s"):
        console.print(f"time: {report['seconds']} s, {report['mb_per_s']} MB/s")
    return buf.getvalue().rstrip()
