"""`cai view` on a big stage: how long the first page of a 100,000-record SL stage takes.

Side by side: the viewer's first page (reads only its own lines and counts the rest), a
later page (one newline scan, then seeks), a filtered page and a text search (one scan
each, raw-line tests before parsing), against what a naive viewer would do first: parse the
whole data.jsonl. Every page is fetched over HTTP from the real app under uvicorn on
127.0.0.1, each from a fresh app with the viewer's caches emptied, unless marked warm (the
OS file cache is warm: the file was just written). Results: benchmarks/results/view.json;
the last line printed is a one-line JSON summary.

    python benchmarks/bench_view.py [--records 100000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import _sentence  # noqa: E402

PRINCIPLES = ("harm-general", "violence", "privacy", "deception", "ethics-general")
CATEGORIES = ("violence", "privacy", "fraud", "self-harm", "misc")
FLAGS = ("bare-refusal", "truncated-prompt")


def make_stage(folder: Path, n: int, rounds: int, seed: int = 0) -> int:
    """An SL stage folder of n records shaped as the SL stage writes them."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prov = {"constitution": {"name": "harmless", "version": "1.0.0", "hash": "sha256:" + "0" * 64},
            "model": "embedded:smollm2-135m", "sampling": {"max_new_tokens": 192},
            "seed": 0, "cai_version": "0.1.0", "created": "2026-12-03T00:00:00+00:00"}
    with open(folder / "data.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            rs = [{"round": r + 1, "principle": rng.choice(PRINCIPLES),
                   "critique_request": _sentence(rng, 15, 25), "critique": _sentence(rng, 30, 60),
                   "revision_request": _sentence(rng, 15, 25), "revision": _sentence(rng, 40, 80),
                   "critique_finish": "stop", "revision_finish": "stop"} for r in range(rounds)]
            flags = [rng.choice(FLAGS)] if rng.random() < 0.05 else []
            rec = {"schema_version": "cai.record/v1", "id": f"{i:024x}", "stage": "sl",
                   "provenance": prov, "kind": "red-team", "prompt_id": f"rt-{i:06d}",
                   "prompt": _sentence(rng, 12, 30), "category": rng.choice(CATEGORIES),
                   "sample": 0, "initial": _sentence(rng, 40, 80), "initial_finish": "stop",
                   "rounds": rs, "final": rs[-1]["revision"], "filters": [], "flags": flags,
                   "keep": True}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (folder / "manifest.json").write_text(json.dumps(
        {"stage": "sl", "constitution": prov["constitution"],
         "counts": {"records": n, "flag:bare-refusal": 0}, "data": {"records": n}}))
    return (folder / "data.jsonl").stat().st_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_get(folder: Path, paths: list[str]) -> list[tuple[float, int, int]]:
    """Start a fresh viewer, GET each path in turn; (seconds, status, bytes) per path."""
    import uvicorn

    from cai.view import create_app, runs

    runs._CACHE.items.clear()  # cold: no line index, count or filter result kept
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app([folder]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    out = []
    try:
        for path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            out.append((round(time.perf_counter() - t, 3), resp.status, len(body)))
    finally:
        server.should_exit = True
        th.join(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sl"
        t = time.perf_counter()
        size = make_stage(folder, args.records, args.rounds)
        print(f"made {args.records} records, {size / 1e6:.0f} MB, in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        t = time.perf_counter()
        with open(folder / "data.jsonl", "rb") as f:
            parsed = [json.loads(line) for line in f if line.strip()]
        whole_parse = round(time.perf_counter() - t, 3)
        assert len(parsed) == args.records
        del parsed
        results = {"whole_file_parse_s": whole_parse}
        for name, paths in (
                ("first_page", ["/run/0/sl"]),
                ("last_page", ["/run/0/sl?page=999999", "/run/0/sl?page=1000"]),
                ("flag_filter", ["/run/0/sl?flag=bare-refusal", "/run/0/sl?flag=bare-refusal&page=2"]),
                ("text_search", ["/run/0/sl?q=rt-099999"])):
            got = timed_get(folder, paths)
            assert all(status == 200 for _, status, _ in got), got
            results[f"{name}_s"] = got[0][0]
            if len(got) > 1:
                results[f"{name}_warm_next_s"] = got[1][0]
            print(json.dumps({"page": name, "timings": got}), file=sys.stderr)
    summary = {"bench": "view", "records": args.records, "rounds": args.rounds,
               "file_mb": round(size / 1e6, 1), **results,
               "first_page_under_2s": results["first_page_s"] < 2.0}
    out = ROOT / "benchmarks" / "results" / "view.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
