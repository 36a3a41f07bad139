"""The README demo: the pipeline's stages on the embedded model, end to end, in minutes.

The embedded model is far too small to critique or judge well; the demo shows that every
stage runs and what each writes. Point the same commands at a real model for real data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cai.backends import load_backend
from cai.constitution import load
from cai.models import DEFAULT_MODEL, local_path

ROOT = Path(__file__).resolve().parent.parent


def _say(msg: str) -> None:
    print(f"[cai demo] {msg}", flush=True)


def run_demo(out: Path, n_prompts: int = 4) -> dict:
    from cai.feedback import LabelConfig, run_label
    from cai.sl import SLConfig, run_sl

    t0 = time.time()
    out = Path(out)
    constitution = ROOT / "constitutions" / "harmless.yaml"
    _say(f"model {DEFAULT_MODEL} -> {local_path(DEFAULT_MODEL)}")
    c = load(constitution)
    _say(f"constitution {c.name} v{c.version} is valid: {len(c.sl_principles)} critique "
         f"principles, {len(c.rl_principles)} comparison principles, hash {c.hash[:19]}...")
    backend = load_backend(DEFAULT_MODEL)
    sl = run_sl(SLConfig(prompts=str(ROOT / "prompts" / "red_team.jsonl"),
                         constitution=str(constitution), model=DEFAULT_MODEL,
                         out=str(out / "sl"), rounds=2, limit=n_prompts, few_shot=1,
                         max_new_tokens=64, seed=0), backend)
    _say(f"SL stage: {sl['counts']['records']} records -> {out / 'sl'}")
    first = json.loads((out / "sl" / "data.jsonl").read_text().splitlines()[0])
    _say(f"prompt:   {first['prompt']}")
    _say(f"initial:  {first['initial'][:200]}")
    for r in first["rounds"]:
        _say(f"round {r['round']} [{r['principle']}] revision: {r['revision'][:200]}")
    pairs = out / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for rec in (json.loads(x) for x in (out / "sl" / "data.jsonl").read_text().splitlines()):
            f.write(json.dumps({"id": rec["id"], "prompt": rec["prompt"],
                                "response_a": rec["initial"], "response_b": rec["final"]}) + "\n")
    lab = run_label(LabelConfig(pairs=str(pairs), constitution=str(constitution),
                                feedback_model=DEFAULT_MODEL, out=str(out / "label"),
                                principles=4, orders="both", seed=0), backend)
    _say(f"labels: {lab['label_stats']} -> {out / 'label'}")
    _say(f"done in {time.time() - t0:.0f} s; see {out}/*/manifest.json and README.md")
    return {"sl": sl, "label": lab}
