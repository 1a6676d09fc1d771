"""`scratchgpt report RUN`: one self-contained HTML page about a run, and a short markdown summary.

RUN/report.html is a single file with no scripts and no network: images are inline PNGs. It
shows the config, the data manifest, the curves in metrics.jsonl (train/val loss, learning rate,
gradient norm, tokens per second, MFU; accuracy and macro-F1 for a classifier), the val
perplexity, the samples printed during training (RUN/samples.jsonl), every RUN/eval-*.json, a
fine-tune's evaluations and confusion matrix, and the environment the run trained in
(RUN/environment.json). `train` and `finetune` write it when they end; this command rewrites it
from the files, e.g. after `scratchgpt eval` added an eval-*.json.

A screenshot in a headless browser (Debian: `apt-get install chromium`):

    chromium --headless --no-sandbox --hide-scrollbars --window-size=1100,2400 \\
        --screenshot=report.png RUN/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from . import UserError
from .runs.files import (ENVIRONMENT_FILE, META_FILE, METRICS_FILE, OLD_EVAL_FILE, REPORT_FILE,
                         RESULT_FILE, SAMPLES_FILE)
from .runs.config import run_config_or_none
from .runs.guard import KIND_NAMES, artifact_kind
from .runs.kind import REPORT_WORDS, run_kind
from .runs.rows import read_rows
from .utils import atomic_write_bytes, human_number, read_json


# (panel title, [(label, metrics.jsonl key)]): a panel is drawn when any of its keys has values
PANELS = [
    ("loss", [("train", "train_loss"), ("train (eval)", "eval_train_loss"), ("val", "val_loss")]),
    ("val perplexity", [("val", "val_ppl")]),
    ("learning rate", [("lr", "lr")]),
    ("gradient norm", [("grad norm", "grad_norm")]),
    ("tokens per second", [("tok/s", "tok_per_s")]),
    ("MFU", [("MFU", "mfu")]),
    ("classification", [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]),
]


# ---------------------------------------------------------------- reading a run
def _json(path: Path) -> Optional[dict]:
    """A run's JSON record, or None where it is missing or damaged (not JSON, not UTF-8, not an object)."""
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _jsonl(path: Path) -> list[dict]:
    try:
        return read_rows(path)  # (a torn or damaged line is skipped: the report shows what is there)
    except UserError:
        return []


def read_run(run: Path) -> dict[str, Any]:
    """Everything the report shows, from the run's files (missing ones are simply absent)."""
    run = Path(run)
    config = run_config_or_none(run)
    if config is None:
        raise UserError(f"{run}: not a run directory (no readable config.json)")
    evals = {}
    for p in sorted(run.glob("eval-*.json")):
        evals[p.stem.removeprefix("eval-")] = _json(p)
    if not evals and (run / OLD_EVAL_FILE).exists():  # the earlier name of eval-lm.json
        evals["lm"] = _json(run / OLD_EVAL_FILE)
    meta = _json(Path(config["data"]) / META_FILE) if config.get("data") else None
    return {"run": run, "config": config, "result": _json(run / RESULT_FILE) or {},
            "metrics": _jsonl(run / METRICS_FILE), "samples": _jsonl(run / SAMPLES_FILE), "evals": evals,
            "environment": _json(run / ENVIRONMENT_FILE), "meta": meta, "kind": REPORT_WORDS[run_kind(config)]}


def _params(config: dict) -> Optional[int]:
    """Parameter count of the run's model, built on the meta device (no memory, no init time)."""
    try:
        from .model import ModelConfig, meta_gpt

        return meta_gpt(ModelConfig(**config["model"])).num_params()
    except Exception:  # a config from another version: the report goes on without the count
        return None


# ---------------------------------------------------------------- figures
def curves_png(rows: list[dict]) -> Optional[bytes]:
    """One PNG with a panel per curve present in metrics.jsonl; None when there is nothing to draw."""
    panels = []
    for title, series in PANELS:
        lines = []
        for label, key in series:
            pts = [(r["step"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and isinstance(r.get("step"), int)]
            if pts:
                lines.append((label, key, pts))
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, key, pts in lines:
            sparse = key in ("val_loss", "val_ppl", "eval_train_loss", "accuracy", "macro_f1")
            ax.plot(*zip(*pts), "o-" if sparse else "-", label=label, markersize=3, alpha=0.85)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(lines) > 1:
            ax.legend(fontsize=8)
    # fixed margins in inches (tick labels, titles): tight_layout measures every text and took 40% of the figure
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.55 / w, right=1 - 0.15 / w, bottom=0.45 / h, top=1 - 0.3 / h, wspace=0.22,
                        hspace=0.32)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- HTML
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1060px;
       color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border: 1px solid #e3e3e3;
        text-align: left; vertical-align: top; }
th { background: #f5f5f7; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid #e3e3e3; border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
pre { background: #f7f7f9; border: 1px solid #eee; padding: 8px 10px; white-space: pre-wrap; word-break: break-word;
      font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; margin: 4px 0 12px; }
img { max-width: 100%; } details summary { cursor: pointer; color: #333; margin: 6px 0; }
.cols { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; } .cols h3 { margin: 6px 0 2px; font-size: 14px; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, str) and (not v.strip() or any(c in v for c in "\n\t\r")):
        return json.dumps(v, ensure_ascii=False)  # a prompt of "\n" shows as such, not as nothing
    if _short_list(v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _short_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v)


def _table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) or (isinstance(v, list) and not _short_list(v)):
            cell = f"<pre>{_esc(json.dumps(v, indent=1, ensure_ascii=False))}</pre>"
            rows.append(f"<tr><th>{_esc(k)}</th><td>{cell}</td></tr>")
        else:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            rows.append(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(_fmt(v))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _harness_table(ev: dict) -> str:
    """lm-evaluation-harness results: a row per task and metric, then the run's settings."""
    from .harness import summary_rows

    keys = ("task", "metric", "value", "stderr", "n_shot", "samples", "version")
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if k in keys[2:] else ''}>{_esc(_fmt(r[k]) if r[k] is not None else '')}"
                                    "</td>" for k in keys) + "</tr>" for r in summary_rows(ev))
    about = {k: ev.get(k) for k in ("harness_version", "quantize") if k in ev}
    return f"<table><tr>{head}</tr>{body}</table>" + _table(about)


def _sections(d: dict) -> str:
    """A mapping whose values are mostly mappings (a config): its scalars, then a table per section, side by side."""
    flat = {k: v for k, v in d.items() if not isinstance(v, dict)}
    parts = [f"<div><h3>{_esc(k)}</h3>{_table(v)}</div>" for k, v in d.items() if isinstance(v, dict)]
    return '<div class="cols">' + (f"<div>{_table(flat)}</div>" if flat else "") + "".join(parts) + "</div>"


def _confusion(cm: list[list[int]], labels: list[str]) -> str:
    """Rows: true label, columns: predicted; cells shaded by their share of the row."""
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{_esc(lab)}</th>" for lab in labels) + "</tr>"
    body = []
    for lab, row in zip(labels, cm):
        total = sum(row) or 1
        cells = "".join(f'<td class="num" style="background: rgba(52,120,246,{0.08 + 0.7 * v / total:.2f})">{v}</td>'
                        for v in row)
        body.append(f"<tr><th>{_esc(lab)}</th>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>'
                                           for k, v in items) + "</div>"


def headline(info: dict) -> list[tuple[str, str]]:
    """The figures a reader looks for first: (label, value)."""
    result, rows, kind = info["result"], info["metrics"], info["kind"]
    out: list[tuple[str, str]] = []
    if kind == "pretraining":
        if result.get("final_val_loss") is not None:
            out += [("val loss (whole val split)", f"{result['final_val_loss']:.4f}"),
                    ("val perplexity", f"{result['final_perplexity']:.2f}")]
        else:
            evals = [r for r in rows if r.get("val_loss") is not None]
            if evals:
                out += [("val loss (estimate)", f"{evals[-1]['val_loss']:.4f}"),
                        ("val perplexity (estimate)", f"{math.exp(min(evals[-1]['val_loss'], 50)):.2f}")]
        if result.get("best_val_loss") is not None:
            out.append(("best val estimate", f"{result['best_val_loss']:.4f}"))
        if result.get("step") is not None:
            out.append(("steps", f"{result['step']:,} ({result.get('stop_reason', '')})"))
        if result.get("tokens"):
            out.append(("tokens seen", human_number(result["tokens"])))
        timed = [r for r in rows if "elapsed_s" in r]
        if timed:
            out.append(("training time", _duration(timed[-1]["elapsed_s"])))
        speed = [r["tok_per_s"] for r in rows if isinstance(r.get("tok_per_s"), (int, float))]
        if speed:
            out.append(("median tok/s", human_number(sorted(speed)[len(speed) // 2])))
    else:
        best = result.get("best") or {}
        if "accuracy" in best:
            out += [("best val accuracy", f"{best['accuracy']:.4f}"), ("best val macro-F1", f"{best['macro_f1']:.4f}")]
            if result.get("majority_baseline") is not None:
                out.append(("majority baseline", f"{result['majority_baseline']:.4f}"))
        if best.get("val_loss") is not None:
            out += [("best val loss", f"{best['val_loss']:.4f}")]
            if kind == "sft":
                out.append(("val perplexity", f"{math.exp(min(best['val_loss'], 50)):.2f}"))
        if result.get("steps") is not None:
            out.append(("steps", f"{result['steps']:,} ({result.get('stop_reason', '')})"))
        if result.get("elapsed_s") is not None:
            out.append(("training time", _duration(result["elapsed_s"])))
    params = _params(info["config"])
    if params:
        out.append(("parameters", human_number(params)))
    return out


def render_html(info: dict) -> str:
    """The report page (a string; write_report saves it)."""
    run, config, result = info["run"], info["config"], info["result"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(run.name)}: scratchgpt "
             f"report</title><style>{_CSS}</style></head><body>",
             f"<h1>{_esc(run)}</h1><p class='sub'>{_esc(info['kind'])} run · scratchgpt report</p>",
             _cards(headline(info))]
    png = curves_png(info["metrics"])
    if png:
        parts.append("<h2>Curves</h2><img alt='training curves' src='data:image/png;base64,"
                     + base64.b64encode(png).decode("ascii") + "'>")
    if info["kind"] == "classifier":
        best = result.get("best") or {}
        labels = config["classifier"]["labels"]
        if best.get("confusion_matrix"):
            parts.append(f"<h2>Confusion matrix (val, best step {best.get('step')})</h2>"
                         + _confusion(best["confusion_matrix"], labels))
    if info["kind"] != "pretraining":
        evals = [r for r in info["metrics"] if r.get("val_loss") is not None]
        if evals:
            keys = [k for k in ("step", "epoch", "train_loss", "val_loss", "accuracy", "macro_f1", "val_tokens")
                    if any(k in r for r in evals)]
            head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td class='num'>{_esc(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                           for r in evals)
            parts.append(f"<h2>Fine-tuning evaluations</h2><table><tr>{head}</tr>{body}</table>")
    if result:
        parts.append("<h2>Result</h2>" + _table({k: v for k, v in result.items() if k != "best"}
                                                 | ({"best": result["best"]} if "best" in result else {})))
    if info["evals"]:
        parts += _evals_html(info["evals"])
    if info["samples"]:
        parts.append(f"<h2>Samples during training ({len(info['samples'])})</h2>")
        for smp in info["samples"]:
            prompt = smp.get("prompt") or ""
            parts.append(f"<div><b>step {_esc(smp.get('step'))}</b> · prompt {_esc(json.dumps(prompt))}</div>"
                         f"<pre>{_esc(prompt + smp.get('text', ''))}</pre>")
    parts.append("<h2>Config</h2>" + _sections(config))
    if info["meta"]:
        meta = info["meta"]
        parts.append(f"<h2>Data: {_esc(config.get('data'))}</h2>"
                     + _table({k: v for k, v in meta.items() if not isinstance(v, (dict, list))}))
        nested = {k: v for k, v in meta.items() if isinstance(v, (dict, list))}
        if nested:
            parts.append("<details><summary>manifest details</summary>" + _table(nested) + "</details>")
    elif "finetune" in config:
        ft = config["finetune"]
        parts.append("<h2>Data</h2>" + _table({k: ft.get(k) for k in ("task", "train_file", "val_file", "base")
                                               if k in ft}))
    if info["environment"]:
        parts.append("<h2>Environment</h2>" + _table(info["environment"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _evals_html(evals: dict) -> list[str]:
    """The report's section on `scratchgpt eval`'s results (eval-*.json)."""
    parts = ["<h2>Evaluations (scratchgpt eval)</h2>"]
    for name, ev in evals.items():
        if not isinstance(ev, dict):
            continue
        parts.append(f"<h3>eval-{_esc(name)}.json</h3>")
        if name.startswith("harness"):
            parts.append(_harness_table(ev))
            continue
        if ev.get("confusion_matrix") and ev.get("labels"):
            parts.append(_confusion(ev["confusion_matrix"], ev["labels"]))
        parts.append(_table({k: v for k, v in ev.items() if k not in ("confusion_matrix", "per_class")}))
    return parts


def write_report(run: Path) -> Path:
    """Write RUN/report.html from the run's files; returns its path. Only into a run: never into a checkpoint
    folder, an export or a data dir (their files are theirs, runs/guard.py)."""
    kind = artifact_kind(run)
    if kind not in (None, "run"):
        hint = f": give its run, {Path(run).parent}" if kind == "checkpoint" else ""
        raise UserError(f"{run} is a {KIND_NAMES[kind]}, not a run directory{hint}")
    info = read_run(Path(run))
    path = Path(run) / REPORT_FILE
    atomic_write_bytes(path, render_html(info).encode("utf-8"))
    return path


# ---------------------------------------------------------------- the terminal summary
def summary(run: Path, report_path: Optional[Path] = None) -> str:
    """A short markdown summary: the headline figures, the last sample, the report's path."""
    info = read_run(Path(run))
    result = info["result"]
    what = f"{info['kind']}" + (f", stopped by {result['stop_reason']}" if result.get("stop_reason") else "")
    lines = [f"## {run} ({what})", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline(info)]
    if info["samples"]:
        last = info["samples"][-1]
        text = ((last.get("prompt") or "") + last.get("text", "")).strip("\n")
        lines += ["", f"Sample at step {last.get('step')}:", "", *("    " + ln for ln in text.splitlines()[:12])]
    if report_path is not None:
        lines += ["", f"Report: {report_path}"]
    return "\n".join(lines)


def report_cli(run: Path, out: Optional[TextIO] = None) -> Path:
    """`scratchgpt report RUN`: write RUN/report.html, print the summary."""
    path = write_report(run)
    print(summary(run, path), file=out or sys.stderr, flush=True)
    return path


def report_at_end(run: Path) -> None:
    """What train and finetune call when they end: the report, or a warning (the run itself is saved)."""
    try:
        report_cli(run)
    except Exception as e:  # a report is never worth losing a finished run's exit status
        print(f"warning: could not write {Path(run) / REPORT_FILE}: {type(e).__name__}: {e}", file=sys.stderr)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"
