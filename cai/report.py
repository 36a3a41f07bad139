"""`runs/<name>/report.md`: what a run produced, in tables and PNG plots, instead of jsonl.

Read from the stage folders a pipeline wrote (any subset): SL counts, label statistics
(how many labels carried signal), what the PM learned from each data source and how well
calibrated it is, the policies' Elo table with intervals, refusal rates, reward and KL
curves, time per stage, and a few prompts with every model's answer side by side.
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
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "–" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def _clip(text: str, n: int = 300) -> str:
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


def _sl(root: Path) -> list[str]:
    m = _manifest(root / "sl")
    if not m:
        return []
    c = m.counts
    lines = ["## SL-CAI data", "",
             f"{c.get('records')} records, {c.get('rounds')} critique → revision rounds each; "
             f"{c.get('kept')} kept after the quality filters, giving {c.get('sft_examples')} "
             f"SFT examples and {c.get('pairs')} revision ≻ initial pairs.", ""]
    filt = [[k.split(":", 1)[1], v] for k, v in c.items() if k.startswith(("filter:", "flag:"))]
    if filt:
        lines += _table(["filter / flag", "records"], filt)
    return lines


def _labels(root: Path) -> list[str]:
    lines: list[str] = []
    for folder in [root / "label", *sorted(root.glob("round-*/label"))]:
        m = _manifest(folder)
        if not m:
            continue
        s = m.label_stats or {}
        n = s.get("pairs") or 0
        ties = round((s.get("tie_rate") or 0) * n)
        judge = m.config.get("judge") or {}  # the label stage's nested judge config
        lines += [f"## AI labels ({folder.relative_to(root)})", "",
                  f"{n} pairs labelled by `{m.models.get('feedback')}` under "
                  f"{judge.get('principles')} principles in {judge.get('orders')} "
                  f"orders. **{n - ties} of {n} labels carried signal** (|p − ½| ≥ "
                  f"{judge.get('tie_threshold')}); {ties} were ties.", ""]
        lines += _table(["statistic", "value"], [[k, v] for k, v in s.items()])
    return lines


SOURCES = {"labels": "AI labels (chosen ≻ rejected)", "sl-pairs": "SL pairs (revision ≻ initial)"}
"""How the report names the PM's data sources."""


def _pm(root: Path) -> list[str]:
    folder = _latest(root, "pm")
    ev = PreferenceEval.read(folder)
    if ev is None:
        return []
    lines = ["## Preference model", "",
             f"Held-out accuracy {_fmt(ev.get('accuracy'))} on {_fmt(ev.get('pairs'))} pairs, "
             f"mean margin {_fmt(ev.get('mean_margin'))}, ECE {_fmt(ev.get('ece'))}.", ""]
    if ev.by_source:
        lines += ["What the PM learned from each source (held-out pairs; 0.5 is chance):", ""]
        lines += _table(["source", "pairs", "accuracy"],
                        [[SOURCES.get(src, src), v.pairs, v.accuracy]
                         for src, v in ev.by_source.items()])
    if (folder / "calibration.png").exists():
        lines += [f"![PM calibration]({(folder / 'calibration.png').relative_to(root)})", ""]
    return lines


def _policies(root: Path) -> list[str]:
    rep = PolicyEvalReport.read(root / "eval")
    if rep is None:
        return []
    lines = ["## Policies", ""]
    lines += [f"Evaluation judge: `{rep.judge_model}`" + (
        f" — **{rep.judge_note}** (give the evaluation a judge of its own: `eval.judge_model` in "
        "the pipeline config, `--judge` on `cai eval policies`)." if rep.judge_note
        else f"; the labeller was `{rep.labeller}`."), ""]
    if rep.principle_sets:
        column = {"red_team": "Elo red-team and harmless win rate",
                  "helpful": "Elo helpful and helpful win rate"}
        lines += ["Principle set behind each column: "
                  + "; ".join(f"{column.get(s, s)}: {v.set} (`{v.source}`, "
                              f"{len(v.principles)} principles, K = {v.k} per pair)"
                              for s, v in rep.principle_sets.items())
                  + "; overall Elo pools both.", ""]
    overall = rep.elo.get("overall", {})
    if overall:
        wins = rep.win_rate_vs_field
        rows = []
        for name, e in sorted(overall.items(), key=lambda kv: -kv[1].rating):
            lo, hi = rep.interval("overall", name)
            rows.append([name, round(e.rating, 1), f"[{_fmt(lo, 0)}, {_fmt(hi, 0)}]",
                         rep.rating("red_team", name), rep.rating("helpful", name),
                         wins.get("harmlessness", {}).get(name),
                         wins.get("helpfulness", {}).get(name)])
        lines += ["Elo from pairwise AI-judge comparisons in both orders (95 % bootstrap interval "
                  "over prompts, resampled within each prompt set); win rates are against all "
                  "other models (red-team prompts for harmlessness, helpful prompts for "
                  "helpfulness):", ""]
        lines += _table(["model", "Elo", "95 % interval", "Elo red-team", "Elo helpful",
                         "harmless win rate", "helpful win rate"], rows)
    if rep.refusal:
        judged = rep.refusal_judged or {}
        lines += ["Refusal rates (over-refusal = refusing a benign request that merely sounds "
                  "sensitive). Pattern: the text check `cai.core.text.is_refusal` (its accuracy "
                  "on a held-out labelled table is in the README)"
                  + ("; judge: the evaluation judge asked whether each answer declines "
                     "(P > ½)." if judged else "."), ""]
        header = ["model", "over-refusal (benign), pattern", "refusal (red-team), pattern",
                  "refusal (helpful), pattern"]
        if judged:
            header += ["over-refusal (benign), judge", "refusal (red-team), judge"]
        lines += _table(header, [[k, v.benign, v.red_team, v.helpful]
                                 + ([(judged.get(k) or {}).get("benign"),
                                     (judged.get(k) or {}).get("red_team")] if judged else [])
                                 for k, v in rep.refusal.items()])
    lines += _conditions(rep)
    for png, title in (("elo.png", "Elo"), ("reward_vs_sqrt_kl.png", "reward vs sqrt(KL)")):
        if (root / "eval" / png).exists():
            lines += [f"![{title}](eval/{png})", ""]
    return lines


def _conditions(rep: PolicyEvalReport) -> list[str]:
    """Benchmark compliance and over-refusal, and each test condition beside the plain one."""
    if not rep.by_condition or (rep.benchmark is None and len(rep.by_condition) < 2):
        return []
    lines = ["### Test conditions" + (" and benchmark" if rep.benchmark else ""), ""]
    if rep.benchmark:
        b = rep.benchmark
        lines += [f"Benchmark `{b.format}` (`{b.path}`): {b.unsafe} unsafe prompts (answering "
                  f"one is compliance) and {b.safe} safe ones (declining one is over-refusal).", ""]
    judged = any(r.judge for per in rep.by_condition.values() for r in per.values())
    header = ["condition", "model", "unsafe compliance", "safe over-refusal",
              "red-team refusal", "benign over-refusal"]
    if judged:
        header += ["unsafe compliance, judge", "safe over-refusal, judge"]
    rows = []
    for cond, per in rep.by_condition.items():
        for name, r in per.items():
            rows.append([cond, name, r.pattern.unsafe_compliance, r.pattern.safe_over_refusal,
                         r.pattern.red_team_refusal, r.pattern.over_refusal]
                        + ([r.judge.unsafe_compliance if r.judge else None,
                            r.judge.safe_over_refusal if r.judge else None] if judged else []))
    lines += ["Rates by the text check (and by the judge where asked); every prompt answered "
              "once per condition, answers in `eval/conditions.jsonl`:", ""]
    return lines + _table(header, rows)


def _prompt_split(root: Path) -> list[str]:
    """Which prompts each stage saw: the pipeline's train/eval split of each prompt set."""
    split = (_json(root / "pipeline.json") or {}).get("prompt_split")
    if not split:
        return []
    if not split.get("eval_fraction"):
        return ["## Prompts", "", "No held-out split (`eval_fraction: 0`): the evaluation's prompts "
                f"include **{split.get('overlap')}** that a training stage read, so its numbers are "
                "measured partly on training prompts.", ""]
    lines = ["## Prompts", "",
             f"Each prompt set a training stage reads is split once by a seeded hash of the prompt "
             f"id (seed {split.get('seed')}, {_fmt(split.get('eval_fraction'), 2)} held out): SL, "
             "labels and RL read the train part, the evaluation the eval part.", ""]
    rows = [[name, v.get("train"), v.get("eval"), ", ".join(v.get("train_stages") or []) or "–",
             ", ".join(v.get("eval_stages") or []) or "–"]
            for name, v in (split.get("sets") or {}).items()]
    lines += _table(["prompt set", "train prompts", "eval prompts", "stages on the train part",
                     "stages on the eval part"], rows)
    overlap = split.get("overlap")
    if overlap is not None:
        lines += [f"Eval prompts found in a training stage's records: **{overlap}**.", ""]
    return lines


def _rl(root: Path) -> list[str]:
    folder = _latest(root, "rl")
    log = _jsonl(folder / "log.jsonl")
    if not log:
        return []
    try:
        from cai.train.plots import plot_run

        pngs = plot_run(folder)
    except Exception:  # noqa: BLE001 - a missing plot must not lose the report
        pngs = []
    first, last = log[0], log[-1]
    lines = ["## RL", "",
             f"{len(log)} logged steps: mean reward {_fmt(first.get('reward'))} → "
             f"{_fmt(last.get('reward'))}, KL {_fmt(first.get('kl'))} → {_fmt(last.get('kl'))}.", ""]
    keep = ("reward", "kl", "sqrt_kl", "entropy", "response_length", "clip_fraction",
            "value_loss")
    lines += [f"![{Path(p).stem}]({Path(p).resolve().relative_to(root.resolve())})"
              for p in pngs if Path(p).stem in keep]
    return lines + [""]


def _times(root: Path) -> list[str]:
    state = _json(root / "pipeline.json")
    if not state:
        return []
    rows = [[k, v.get("status"), v.get("seconds")] for k, v in state.get("steps", {}).items()]
    lines = ["## Time per stage", ""] + _table(["stage", "last status", "seconds (last run)"], rows)
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
        lines += ["![time per stage](time_per_stage.png)", ""]
    return lines


def _tokens(root: Path) -> list[str]:
    """Tokens each stage's models read and wrote (and their cost, where priced), beside the
    time per stage: from each stage manifest's `tokens`."""
    rows = []
    for path in sorted([*root.glob("*/manifest.json"), *root.glob("round-*/*/manifest.json")]):
        m = _manifest(path.parent)
        for model, t in ((m.tokens if m else None) or {}).items():
            rows.append([str(path.parent.relative_to(root)), f"`{model}`", t.get("prompt_tokens"),
                         t.get("completion_tokens"), t.get("usd", "")])
    if not rows:
        return []
    return (["## Tokens per stage", ""]
            + _table(["stage", "model", "prompt tokens", "completion tokens", "cost (USD)"], rows))


def _examples(root: Path, n: int = 3) -> list[str]:
    rows = Example.read_all(root / "eval")[:n]
    if not rows:
        return []
    lines = ["## Examples", ""]
    for r in rows:
        lines += [f"**Prompt:** {_clip(r.prompt, 400)}", ""]
        lines += _table(["model", "answer"], [[k, _clip(v)] for k, v in r.responses.items()])
    return lines


def write_report(root: str | Path) -> Path:
    """Write `<root>/report.md` from whatever stages the run folder holds."""
    root = Path(root)
    state = _json(root / "pipeline.json") or {}
    name = (state.get("config") or {}).get("name", root.name)
    body = [f"# Run report: {name}", ""]
    for part in (_prompt_split, _sl, _labels, _pm, _rl, _policies, _examples, _times, _tokens):
        body += part(root)
    path = root / "report.md"
    write_text_atomic(path, "\n".join(body) + "\n")
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
    from cai.core.errors import CaiError
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


__all__ = ["write_report", "write_report_html", "render_report_html"]
