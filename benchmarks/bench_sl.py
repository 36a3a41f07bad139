"""SL stage speed: today's transformers path vs transformers with prefix reuse vs vLLM.

    python benchmarks/bench_sl.py [--prompts 8] [--rounds 2,4] [--max-new-tokens 32] [--no-vllm]

The same SL run (the full five-example few-shot constitution, N red-team prompts) three ways:
- `today`: transformers, every request recomputes its whole prompt (`prefix_cache_mb=0`);
- `hf_reuse`: transformers with the KV prefix cache (the few-shot head computed once, every
  step resuming from the previous step's conversation);
- `vllm`: vLLM with automatic prefix caching.

Token counts give the ideal speedup of reuse over today: (prefill tokens recomputed + decode
tokens) / (unique tokens of all prompts and outputs). Decode tokens cost far more than
prefill tokens on a CPU (each decode step reads every weight and the whole KV cache), so a
second ideal weights them by time: the prefill time measured in today's run, scaled by
unique / recomputed prefill tokens, plus everything else unchanged. Writes
benchmarks/results/sl.json and prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import matmul_peak_flops, record_results, unique_tokens  # noqa: E402


class Recorder:
    """Wraps a backend: keeps each generation request's prompt ids and output ids."""

    def __init__(self, backend, encode, tok):
        self.inner, self.encode, self.tok = backend, encode, tok
        self.prompts: list[list[int]] = []
        self.outputs: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, config):
        outs = self.inner.generate(requests, config)
        for r, g in zip(requests, outs):
            self.prompts.append(self.encode(r.chat, r.answer_prefix))
            self.outputs.append(self.tok.encode(g.text, add_special_tokens=False))
        return outs


class ForwardTimer:
    """Wall time of the model's prefill forwards (more than one new token per row)."""

    def __init__(self, model):
        self.prefill = 0.0
        self._t = 0.0
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._t = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            self.prefill += time.perf_counter() - self._t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", default="2,4")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()

    import torch

    from cai.backends.hf import HFBackend, HFOptions
    from cai.sl import SLConfig, run_sl

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak_flops()
    spec = "embedded:smollm2-135m"
    reuse = HFBackend(spec, options=HFOptions(progress=False))
    today = HFBackend(spec, model=reuse.model, tokenizer=reuse.tok,
                      options=HFOptions(progress=False, prefix_cache_mb=0))
    timer = ForwardTimer(reuse.model)
    backends = {"today": today, "hf_reuse": reuse, "vllm": None}
    if not args.no_vllm:
        try:
            from cai.backends.vllm import VLLMBackend

            backends["vllm"] = VLLMBackend("vllm:" + spec)
        except Exception as exc:  # noqa: BLE001 - report what could not run, measure the rest
            print(f"vllm unavailable: {exc}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="bench-sl-"))
    rows = []
    try:
        for rounds in [int(r) for r in args.rounds.split(",")]:
            base = dict(prompts=str(ROOT / "prompts" / "red_team.jsonl"),
                        constitution=str(ROOT / "constitutions" / "harmless.yaml"),
                        rounds=rounds, max_new_tokens=args.max_new_tokens, few_shot=None,
                        seed=0, limit=args.prompts, helpful_ratio=0.0)
            row: dict = {"rounds": rounds, "prompts": args.prompts}
            finals = {}
            for name, backend in backends.items():
                if backend is None:
                    continue
                if name == "hf_reuse":
                    reuse.prefix_cache.clear()  # nothing carried over from an earlier run
                rec = Recorder(backend, reuse.encode_chat, reuse.tok)
                timer.prefill = 0.0
                t = time.perf_counter()
                run_sl(SLConfig(**base, out=str(tmp / f"{name}-{rounds}")), rec)
                secs = time.perf_counter() - t
                row[f"{name}_s"] = round(secs, 2)
                lines = (tmp / f"{name}-{rounds}" / "data.jsonl").read_text().splitlines()
                finals[name] = [json.loads(x)["final"] for x in lines]
                if name == "today":
                    recomputed = sum(len(p) for p in rec.prompts)
                    decode = sum(len(o) for o in rec.outputs)
                    unique = unique_tokens(rec.prompts + [p + o for p, o in
                                                          zip(rec.prompts, rec.outputs)])
                    row.update(requests=len(rec.prompts), prefill_tokens_recomputed=recomputed,
                               decode_tokens=decode, unique_tokens=unique,
                               ideal_speedup_tokens=round((recomputed + decode) / unique, 3),
                               today_prefill_s=round(timer.prefill, 2))
                    unique_prefill = max(unique - decode, 0)
                    ideal_s = secs - timer.prefill * (1 - unique_prefill / recomputed)
                    row["ideal_speedup_timed"] = round(secs / ideal_s, 3)
                else:
                    speed = row["today_s"] / secs
                    row[f"{name}_speedup"] = round(speed, 3)
                    row[f"{name}_of_ideal_tokens"] = round(speed / row["ideal_speedup_tokens"], 3)
                    row[f"{name}_of_ideal_timed"] = round(speed / row["ideal_speedup_timed"], 3)
                    row[f"{name}_same_finals_as_today"] = finals[name] == finals["today"]
                print(json.dumps({name: row.get(f"{name}_s"), "rounds": rounds}), file=sys.stderr)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak_after = matmul_peak_flops()
    summary = {"bench": "sl", "model": spec, "threads": torch.get_num_threads(),
               "max_new_tokens": args.max_new_tokens, "few_shot": "all (5)",
               "matmul_peak_gflops": round(min(peak, peak_after) / 1e9, 1), "results": rows}
    record_results("sl", min(peak, peak_after), summary)
    line = {"bench": "sl", "peak_gflops": summary["matmul_peak_gflops"]}
    for r in rows:
        line[f"R{r['rounds']}"] = {k: r.get(k) for k in (
            "ideal_speedup_tokens", "ideal_speedup_timed", "hf_reuse_speedup",
            "hf_reuse_of_ideal_tokens", "hf_reuse_of_ideal_timed", "vllm_speedup",
            "hf_reuse_same_finals_as_today")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
