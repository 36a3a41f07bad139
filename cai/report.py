"""`runs/<name>/report.md`: what a run produced, in tables and PNG plots, instead of jsonl.

Read from the stage folders a pipeline wrote (any subset): SL counts, label statistics
(how many labels carried signal), what the PM learned from each data source and how well
calibrated it is, the policies' Elo table with intervals, refusal rates, reward and KL
curves, time per stage, and a few prompts with every model's answer side by side.

The functions here gather those values; the Markdown around them is the Jinja2 template
`cai/view/templates/report.md.j2` (beside the viewer's pages), and `report.html` is that
Markdown rendered into one self-contained page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.eval_report import PolicyEvalReport
from cai.core.folders import MANIFEST, read_manifest
from cai.core.manifest import Manifest
from cai.core.records import write_text_atomic
from cai.core.results import Example, PreferenceEval
from cai.core.results import read_json as _json
from cai.core.results import read_jsonl as _jsonl


def _fmt(v: Any, digits: int = 3) -> str:
    """A table cell or a number in the text: floats to `digits` places, None as "–"."""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def _clip(text: str, n: int = 300) -> str:
    """One line of at most `n` characters that cannot break a Markdown table."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n] + " …"


def _latest(root: Path, stage: str) -> Path:
    """The newest round's folder of a stage (round-R/stage), or the first round's."""
    rounds = sorted((p for p in root.glob(f"round-*/{stage}") if p.is_dir()),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    return rounds[-1] if rounds else root / stage


def _manifest(folder: Path) -> Manifest | None:
    """A stage folder's manifest, read through its schema; None when it has none or one
    that does not read (a report leaves that stage out rather than failing)."""
    try:
        return read_manifest(folder) if (folder / MANIFEST).is_file() else None
    except CaiError:
        return None


# Each section below reads what it shows from the run folder and returns the values the
# template (`cai/view/templates/report.md.j2`) lays out, or None when the run lacks it.


def _sl(root: Path) -> dict[str, Any] | None:
    m = _manifest(root / "sl")
    if not m:
        return None
    c = m.counts
    return {**{k: c.get(k) for k in ("records", "rounds", "kept", "sft_examples", "pairs")},
            "filters": [[k.split(":", 1)[1], v] for k, v in c.items()
                        if k.startswith(("filter:", "flag:"))]}


def _labels(root: Path) -> list[dict[str, Any]]:
    out = []
    for folder in [root / "label", *sorted(root.glob("round-*/label"))]:
        m = _manifest(folder)
        if not m:
            continue
        s = m.label_stats or {}
        n = s.get("pairs") or 0
        judge = m.config.get("judge") or {}  # the label stage's nested judge config
        out.append({"folder": folder.relative_to(root), "pairs": n,
                    "ties": round((s.get("tie_rate") or 0) * n),
                    "feedback": m.models.get("feedback"),
                    "judge": {k: judge.get(k) for k in ("principles", "orders", "tie_threshold")},
                    "stats": [[k, v] for k, v in s.items()]})
    return out


SOURCES = {"labels": "AI labels (chosen ≻ rejected)", "sl-pairs": "SL pairs (revision ≻ initial)"}
"""How the report names the PM's data sources."""


def _pm(root: Path) -> dict[str, Any] | None:
    folder = _latest(root, "pm")
    ev = PreferenceEval.read(folder)
    if ev is None:
        return None
    png = folder / "calibration.png"
    return {**{k: ev.get(k) for k in ("accuracy", "pairs", "mean_margin", "ece")},
            "by_source": [[SOURCES.get(src, src), v.pairs, v.accuracy]
                          for src, v in ev.by_source.items()],
            "calibration": png.relative_to(root) if png.exists() else None}


COLUMNS = {"red_team": "Elo red-team and harmless win rate",
           "helpful": "Elo helpful and helpful win rate"}
"""The Elo table's columns each principle set stands behind."""


def _policies(root: Path) -> dict[str, Any] | None:
    rep = PolicyEvalReport.read(root / "eval")
    if rep is None:
        return None
    wins = rep.win_rate_vs_field
    elo = []
    for name, e in sorted(rep.elo.get("overall", {}).items(), key=lambda kv: -kv[1].rating):
        lo, hi = rep.interval("overall", name)
        elo.append([name, round(e.rating, 1), f"[{_fmt(lo, 0)}, {_fmt(hi, 0)}]",
                    rep.rating("red_team", name), rep.rating("helpful", name),
                    wins.get("harmlessness", {}).get(name), wins.get("helpfulness", {}).get(name)])
    judged = rep.refusal_judged or {}
    refusal = [[k, v.benign, v.red_team, v.helpful]
               + ([(judged.get(k) or {}).get("benign"), (judged.get(k) or {}).get("red_team")]
                  if judged else [])
               for k, v in rep.refusal.items()] if rep.refusal else []
    return {"judge_model": rep.judge_model, "judge_note": rep.judge_note, "labeller": rep.labeller,
            "principle_sets": [(COLUMNS.get(s, s), v) for s, v in rep.principle_sets.items()]
            if rep.principle_sets else [],
            "elo": elo, "refusal": refusal, "refusal_judged": bool(judged),
            "conditions": _conditions(rep),
            "figures": [(title, png) for png, title in (("elo.png", "Elo"),
                                                        ("reward_vs_sqrt_kl.png", "reward vs sqrt(KL)"))
                        if (root / "eval" / png).exists()]}


def _conditions(rep: PolicyEvalReport) -> dict[str, Any] | None:
    """Benchmark compliance and over-refusal, and each test condition beside the plain one."""
    if not rep.by_condition or (rep.benchmark is None and len(rep.by_condition) < 2):
        return None
    judged = any(r.judge for per in rep.by_condition.values() for r in per.values())
    rows = []
    for cond, per in rep.by_condition.items():
        for name, r in per.items():
            rows.append([cond, name, r.pattern.unsafe_compliance, r.pattern.safe_over_refusal,
                         r.pattern.red_team_refusal, r.pattern.over_refusal]
                        + ([r.judge.unsafe_compliance if r.judge else None,
                            r.judge.safe_over_refusal if r.judge else None] if judged else []))
    return {"benchmark": rep.benchmark, "judged": judged, "rows": rows}


def _prompt_split(root: Path) -> dict[str, Any] | None:
    """Which prompts each stage saw: the pipeline's train/eval split of each prompt set."""
    split = (_json(root / "pipeline.json") or {}).get("prompt_split")
    if not split:
        return None
    return {"eval_fraction": split.get("eval_fraction"), "seed": split.get("seed"),
            "overlap": split.get("overlap"),
            "rows": [[name, v.get("train"), v.get("eval"),
                      ", ".join(v.get("train_stages") or []) or "–",
                      ", ".join(v.get("eval_stages") or []) or "–"]
                     for name, v in (split.get("sets") or {}).items()]}


RL_FIGURES = ("reward", "kl", "sqrt_kl", "entropy", "response_length", "clip_fraction",
              "value_loss")
"""The RL curves the report shows, of those `cai.train.plots.plot_run` draws."""


def _rl(root: Path) -> dict[str, Any] | None:
    folder = _latest(root, "rl")
    log = _jsonl(folder / "log.jsonl")
    if not log:
        return None
    try:
        from cai.train.plots import plot_run

        pngs = plot_run(folder)
    except Exception:  # noqa: BLE001 - a missing plot must not lose the report
        pngs = []
    first, last = log[0], log[-1]
    return {"steps": len(log), "first": {k: first.get(k) for k in ("reward", "kl")},
            "last": {k: last.get(k) for k in ("reward", "kl")},
            "figures": [(Path(p).stem, Path(p).resolve().relative_to(root.resolve()))
                        for p in pngs if Path(p).stem in RL_FIGURES]}


def _times(root: Path) -> dict[str, Any] | None:
    """Seconds per step of the last run, as a table and a bar chart (time_per_stage.png)."""
    state = _json(root / "pipeline.json")
    if not state:
        return None
    rows = [[k, v.get("status"), v.get("seconds")] for k, v in state.get("steps", {}).items()]
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1))
        ax.barh([r[0] for r in rows][::-1], [r[2] or 0 for r in rows][::-1], color="#4c72b0")
        ax.set(xlabel="seconds", title="time per stage (last run of each)")
        fig.tight_layout()
        fig.savefig(root / "time_per_stage.png", dpi=100)
        plt.close(fig)
    return {"rows": rows, "figure": bool(rows)}


def _tokens(root: Path) -> list[list[Any]]:
    """Tokens each stage's models read and wrote (and their cost, where priced), beside the
    time per stage: from each stage manifest's `tokens`."""
    rows = []
    for path in sorted([*root.glob("*/manifest.json"), *root.glob("round-*/*/manifest.json")]):
        m = _manifest(path.parent)
        for model, t in ((m.tokens if m else None) or {}).items():
            rows.append([str(path.parent.relative_to(root)), f"`{model}`", t.get("prompt_tokens"),
                         t.get("completion_tokens"), t.get("usd", "")])
    return rows


def _examples(root: Path, n: int = 3) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "answers": [[k, _clip(v)] for k, v in r.responses.items()]}
            for r in Example.read_all(root / "eval")[:n]]


def render_report(root: str | Path) -> str:
    """The Markdown of `<root>/report.md` from whatever stages the run folder holds."""
    from jinja2 import Environment, PackageLoader

    root = Path(root)
    state = _json(root / "pipeline.json") or {}
    env = Environment(loader=PackageLoader("cai.view", "templates"), autoescape=False,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    env.filters["clip"] = _clip
    sections = {"split": _prompt_split(root), "sl": _sl(root), "labels": _labels(root),
                "pm": _pm(root), "rl": _rl(root), "policies": _policies(root),
                "examples": _examples(root), "times": _times(root), "tokens": _tokens(root)}
    name = (state.get("config") or {}).get("name", root.name)
    return env.get_template("report.md.j2").render(name=name, **sections)


def write_report(root: str | Path) -> Path:
    """Write `<root>/report.md` from whatever stages the run folder holds."""
    root = Path(root)
    path = root / "report.md"
    write_text_atomic(path, render_report(root))
    return path


_HTML_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1000px; margin: 2rem auto; padding: 0 1rem;
       color: #1d232a; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d6de; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
img { max-width: 100%; border: 1px solid #d0d6de; }
code { background: #f2f4f7; padding: 0 .2rem; }
"""


def _inline_image(root: Path, src: str) -> str | None:
    """A PNG inside the run as a data: URI; None for anything else (no outside fetches)."""
    import base64

    if ":" in src or src.startswith(("/", "\\")):
        return None
    base = root.resolve()
    p = (base / src).resolve()
    if base not in p.parents or p.suffix.lower() != ".png" or not p.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def render_report_html(root: str | Path, markdown: str) -> str:
    """The report's markdown as one self-contained HTML page: styles and figures inline.

    Raw HTML in the markdown (a red-team prompt quoted in the examples) is escaped, links
    that are not plain web or relative links are dropped, and a figure that is not a PNG
    inside the run folder is left out, so the file opens offline and runs nothing.
    """
    from html import escape

    from markdown_it import MarkdownIt

    root = Path(root)
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer, tokens, idx, options, env):  # noqa: ANN001 - markdown-it calls it so
        tok = tokens[idx]
        alt = escape(tok.content or "")
        data = _inline_image(root, str(tok.attrGet("src") or ""))
        if data is None:
            return f"<em>[figure not inlined: {alt}]</em>"
        return f'<img src="{data}" alt="{alt}">'

    md.add_render_rule("image", image)
    title = next((line[2:].strip() for line in markdown.splitlines() if line.startswith("# ")),
                 "Run report")
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">\n"
            f"<title>{escape(title)}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
            f"{md.render(markdown)}</body>\n</html>\n")


def write_report_html(root: str | Path, out: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write the report as one self-contained HTML file (default `<root>/report.html`),
    after refreshing `<root>/report.md` from the run folder.

    `out` follows the rule of every command that writes a file (`check_out_file`): never a
    file or folder of the run (the report reads them), an existing file only with
    `overwrite`; checked before anything is written."""
    from cai.core.folders import check_out_file

    root = Path(root)
    if not root.is_dir():
        raise CaiError("not a run folder", str(root))
    own = root / "report.html"
    path = own
    if out is not None:
        reads = [root / "report.md", root / "pipeline.json",
                 *(p for p in root.iterdir() if p.name != "report.html")]
        path = check_out_file(out, inputs=reads, overwrite=overwrite, own=[own])
    elif path.is_dir():
        raise CaiError("is a folder; give a file name for the HTML report", str(path))
    md_path = write_report(root)
    html = render_report_html(root, md_path.read_text(encoding="utf-8"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, html)
    except OSError as exc:
        raise CaiError(f"cannot write: {exc.strerror or exc}", str(path)) from None
    return path


__all__ = ["render_report", "write_report", "write_report_html", "render_report_html"]
