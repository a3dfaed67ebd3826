"""Results on disk and on screen: the JSON document, the markdown tables and the comparison of
two runs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from ..ops import AUTO_KEEP_GATES_BYTES
from .config import policy_name
from .environment import describe

FORMAT = "fastbptt-bench/1"

# case field -> column header, in display order
CASE_COLUMNS = {"cell": "cell", "mode": "mode", "device": "device", "dtype": "dtype", "batch": "B", "hidden": "H",
                "input_size": "I", "steps": "T", "layers": "L", "bidirectional": "dir", "loop": "loop"}
ALWAYS = ("cell", "mode")
# runs saved before a case field existed read as its default
CASE_DEFAULTS = {"loop": "layer"}
MIB = 1024 * 1024


def document(plan, env: dict, records: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "preset": plan.name,
        "description": plan.description,
        "settings": {"device": plan.device, "warmup": plan.warmup, "reps": plan.reps,
                     "timer": "CUDA events" if plan.device == "cuda" else "time.perf_counter",
                     "order": "interleaved, rotated every round"},
        "environment": env,
        "records": records,
    }


def save_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_json(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastbptt bench result (format {doc.get('format')!r})")
    return doc


# ----------------------------------------------------------------------------- formatting

def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1e3:.3g} us"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return ""
    if n >= 1024 * MIB:
        return f"{n / (1024 * MIB):.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.3g} MiB"
    return f"{n / 1024:.3g} KiB"


def fmt_ratio(r: Optional[float]) -> str:
    return "" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def fmt_count(n: Optional[int]) -> str:
    return "" if n is None else f"{n:,}"


# ----------------------------------------------------------------------------- tables

class Column(NamedTuple):
    """One column of :func:`markdown_table`: the row key, its header, how a value is written and
    whether the column is right-aligned (numbers)."""
    key: str
    header: str
    fmt: Callable[[object], str] = str
    right: bool = False


def table_lines(head: Sequence[str], body: Iterable[Sequence[str]], right: Sequence[bool] = ()) -> list[str]:
    """A markdown table's lines from its header and rows of cell texts; the columns flagged in
    ``right`` are right-aligned."""
    rule = ["---:" if r else "---" for r in right] + ["---"] * (len(head) - len(right))
    return ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"] + \
        ["| " + " | ".join(cells) + " |" for cells in body]


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """A markdown table of row dicts, one line per row, the cells written by each column's ``fmt``."""
    body = ([c.fmt(row[c.key]) for c in columns] for row in rows)
    return "\n".join(table_lines([c.header for c in columns], body, [c.right for c in columns]))


def _case_field(case: dict, field: str):
    return case.get(field, CASE_DEFAULTS.get(field))


def _case_value(field: str, value) -> str:
    if field == "bidirectional":
        return "bi" if value else "uni"
    return str(value)


def _varying(records: list[dict]) -> list[str]:
    fields = []
    for f in CASE_COLUMNS:
        if f in ALWAYS or len({_case_field(r["case"], f) for r in records}) > 1:
            fields.append(f)
    return fields


def _labels(records: Iterable[dict]) -> list[str]:
    """Candidate labels: the baselines first, then fastbptt in order of appearance."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["candidate"]["label"], None)
    order = {"torch.nn": 0, "torch.compile": 1}
    return sorted(seen, key=lambda lab: order.get(lab, 2))


def _headers(records: list[dict]) -> dict[str, str]:
    """Short column names: 'cpu recompute' for 'fastbptt[cpu,C=32,recompute]', with the chunk size
    only when the run has several; 'cpu' for a cell's 'fastbptt[cpu]'."""
    cands = {r["candidate"]["label"]: r["candidate"] for r in records}
    chunks = _chunk_sizes(records)
    out = {}
    for label, c in cands.items():
        if c["impl"] != "fastbptt":
            out[label] = label
            continue
        if c["chunk_size"] is None and c["recompute"] is None:
            out[label] = c["backend"]
            continue
        out[label] = f"{c['backend']} {policy_name(c['recompute'])}" + (f" C={c['chunk_size']}" if len(chunks) > 1 else "")
    return out


def _chunk_sizes(records: Iterable[dict]) -> list[int]:
    """The chunk sizes of a run's fastbptt layer candidates (cells have none)."""
    return sorted({r["candidate"]["chunk_size"] for r in records
                   if r["candidate"]["impl"] == "fastbptt" and r["candidate"]["chunk_size"] is not None})


class _Notes:
    """Footnotes for failed / unavailable cells: one number per distinct message."""

    def __init__(self):
        self.messages: dict[str, int] = {}

    def mark(self, rec: dict) -> str:
        error = (rec["error"] or "no detail").strip().splitlines()[0]
        msg = f"{rec['candidate']['label']}: {error[:300]}"
        n = self.messages.setdefault(msg, len(self.messages) + 1)
        word = "failed" if rec["status"] == "failed" else "n/a"
        return f"{word} [{n}]"

    def render(self) -> list[str]:
        return [f"[{n}] {msg.replace('|', '/')}" for msg, n in self.messages.items()]


def _pivot(records: list[dict], cell_text, notes: _Notes, baseline_text) -> list[str]:
    fields = _varying(records)
    labels = [lab for lab in _labels(records) if lab != "torch.nn"]
    rows: dict[str, dict[str, dict]] = {}
    cases: dict[str, dict] = {}
    for r in records:
        k = r["key"].split("|")[0]
        cases.setdefault(k, r["case"])
        rows.setdefault(k, {})[r["candidate"]["label"]] = r
    names = _headers(records)
    head = [CASE_COLUMNS[f] for f in fields] + ["torch.nn"] + [names[lab] for lab in labels]
    body = []
    for k, by_label in rows.items():
        cells = [_case_value(f, _case_field(cases[k], f)) for f in fields]
        base = by_label.get("torch.nn")
        cells.append(notes.mark(base) if base and base["status"] != "ok" else baseline_text(base) if base else "")
        for lab in labels:
            rec = by_label.get(lab)
            if rec is None:
                cells.append("")
            elif rec["status"] != "ok":
                cells.append(notes.mark(rec))
            else:
                cells.append(cell_text(rec, base))
        body.append(cells)
    return table_lines(head, body)


NOISY = 1.5  # max / min over the rounds above which a figure is flagged


def _noisy(rec: Optional[dict]) -> bool:
    t = (rec or {}).get("time") or {}
    s = t.get("total")
    return bool(s and s["min_ms"] > 0 and s["max_ms"] / s["min_ms"] > NOISY)


def _speed_cell(rec: dict, base: Optional[dict] = None) -> str:
    s = rec["speedup"]["total"]
    flag = "*" if _noisy(rec) or _noisy(base) else ""
    return f"{fmt_ratio(s)}{flag} ({fmt_ms(rec['time']['total']['median_ms'])})" if s is not None else \
        fmt_ms(rec["time"]["total"]["median_ms"])


def _memory_kind(records: list[dict]) -> str:
    return "peak" if any(r["memory"].get("peak_bytes") is not None for r in records) else "saved"


def summary_tables(doc: dict) -> str:
    """The at-a-glance tables: speedup over torch.nn per case, then activation memory."""
    records = doc["records"]
    env = doc["environment"]
    out = [f"fastbptt bench '{doc['preset']}': {describe(env)}",
           f"timer: {doc['settings']['timer']}, {doc['settings']['warmup']} warm-up + {doc['settings']['reps']} "
           f"interleaved rounds, medians; speedup = torch.nn median / candidate median (same run, >1 is faster)",
           ""]
    chunks = _chunk_sizes(records)
    if len(chunks) == 1:
        auto = any(r["candidate"].get("recompute") == "auto" for r in records)
        out.insert(2, f"fastbptt columns: backend (forced) and memory policy, chunk size {chunks[0]}; "
                      "recompute = keep outputs and chunk states, keep-gates = also keep gate pre-activations"
                      + (f"; auto = the default, keep-gates while the gates take at most "
                         f"{AUTO_KEEP_GATES_BYTES >> 20} MiB per layer and direction, else recompute" if auto else ""))
    if any(_case_field(r["case"], "loop") == "cell" for r in records):
        out.insert(2, "cell loops: a Python loop of T calls of one cell module (torch.nn's cell, that cell "
                      "compiled, fastbptt's cell with the backend named), hidden states stacked")
    notes = _Notes()
    timed = [r for r in records if r["case"]["timed"]]
    if timed:
        out.append("Time of one call (forward+backward in train, forward in infer), speedup over torch.nn:")
        out.append("")
        out += _pivot(timed, _speed_cell, notes, lambda b: fmt_ms(b["time"]["total"]["median_ms"]) if b["time"] else "memory only")
        if any(_noisy(r) for r in timed):
            out.append(f"* noisy: max/min of the rounds above {NOISY} for the candidate or torch.nn; "
                       "rerun on a quiet machine or with more --reps")
        out.append("")
    mem_records = [r for r in records if r["case"]["mode"] == "train"]
    if mem_records:
        kind = _memory_kind(mem_records)
        what = ("peak GPU memory of one training step (torch.cuda.max_memory_allocated, above the resident "
                "parameters and input)" if kind == "peak" else
                "bytes autograd keeps after one forward (unique storages, parameters and input excluded)")
        out.append(f"Memory: {what}; ratio to torch.nn:")
        out.append("")

        def mem_cell(rec, base=None):
            b = rec["memory"].get(f"{kind}_bytes")
            r = rec["memory"].get(f"{kind}_ratio")
            return f"{fmt_ratio(r)} ({fmt_bytes(b)})" if r is not None else fmt_bytes(b)

        out += _pivot(mem_records, mem_cell, notes, lambda b: fmt_bytes(b["memory"].get(f"{kind}_bytes")))
        out.append("")
    if notes.messages:
        out.append("Notes:")
        out += notes.render()
        out.append("")
    return "\n".join(out)


def detail_table(doc: dict) -> str:
    """Every record with every figure: forward, backward and total (median, min, max), speedups and
    memory."""
    head = ["case", "candidate", "status", "forward ms (min-max)", "backward ms (min-max)", "total ms (min-max)",
            "us/step", "speedup fwd/bwd/total", "saved", "peak", "memory vs torch.nn", "saved / output"]
    body = []

    def span(s):
        return "" if not s else f"{s['median_ms']:.4g} ({s['min_ms']:.4g}-{s['max_ms']:.4g})"

    for r in doc["records"]:
        t = r["time"] or {}
        sp = r["speedup"]
        mem = r["memory"]
        ratio = mem.get("peak_ratio") if mem.get("peak_ratio") is not None else mem.get("saved_ratio")
        cells = [r["key"].split("|")[0], r["candidate"]["label"],
                 r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:120]}".replace("|", "/"),
                 span(t.get("forward")), span(t.get("backward")), span(t.get("total")),
                 f"{r['time_per_step_us']:.4g}" if r["time_per_step_us"] else "",
                 "/".join(fmt_ratio(sp[p]) or "-" for p in ("forward", "backward", "total")),
                 fmt_bytes(mem.get("saved_bytes")), fmt_bytes(mem.get("peak_bytes")), fmt_ratio(ratio),
                 f"{mem['saved_to_output']:.2f}" if mem.get("saved_to_output") is not None else ""]
        body.append(cells)
    return "\n".join(table_lines(head, body))


def markdown(doc: dict) -> str:
    env = doc["environment"]
    parts = [f"# fastbptt bench: {doc['preset']}", "", doc.get("description", ""), "",
             "```", summary_tables(doc), "```", "",
             "## Every record", "", detail_table(doc), "",
             "## Environment", "", "```", json.dumps(env, indent=1), "```", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- compare

def compare(old: dict, new: dict) -> str:
    """The change from ``old`` to ``new`` per record present in both: time (new / old - 1, negative
    is faster), speedup over torch.nn and memory; then records whose status changed or that only
    one run has."""
    lines = [f"old: {old['preset']}: {describe(old['environment'])}",
             f"new: {new['preset']}: {describe(new['environment'])}"]
    if old["environment"].get("machine") != new["environment"].get("machine"):
        lines.append("WARNING: the runs come from different machines; absolute times are not comparable, "
                     "speedups over torch.nn are more so.")
    lines.append("")
    old_by = {r["key"]: r for r in old["records"]}
    new_by = {r["key"]: r for r in new["records"]}
    head = ["case", "candidate", "old ms", "new ms", "time change", "old speedup", "new speedup", "old memory",
            "new memory"]
    body = []
    changed = []
    for key, n in new_by.items():
        o = old_by.get(key)
        if o is None:
            continue
        if o["status"] != n["status"]:
            changed.append(f"{key}: {o['status']} -> {n['status']}" + (f" ({n['error'][:160]})" if n["error"] else ""))
        if o["status"] != "ok" or n["status"] != "ok":
            continue
        om = o["time"]["total"]["median_ms"] if o["time"] else None
        nm = n["time"]["total"]["median_ms"] if n["time"] else None
        change = f"{(nm / om - 1) * 100:+.1f}%" if om and nm else ""
        kind = "peak" if n["memory"].get("peak_bytes") is not None else "saved"
        body.append([key.split("|")[0], n["candidate"]["label"], fmt_ms(om), fmt_ms(nm), change,
                     fmt_ratio(o["speedup"]["total"]), fmt_ratio(n["speedup"]["total"]),
                     fmt_bytes(o["memory"].get(f"{kind}_bytes")), fmt_bytes(n["memory"].get(f"{kind}_bytes"))])
    lines += table_lines(head, body)
    only_old = sorted(set(old_by) - set(new_by))
    only_new = sorted(set(new_by) - set(old_by))
    if changed:
        lines += ["", "Status changes:"] + changed
    if only_old:
        lines += ["", f"Only in old ({len(only_old)}):"] + only_old[:50]
    if only_new:
        lines += ["", f"Only in new ({len(only_new)}):"] + only_new[:50]
    return "\n".join(lines) + "\n"
