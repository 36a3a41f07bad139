"""Peak memory of training steps on the CPU against `cai plan memory`'s estimate.

Each case runs in a fresh process (its own allocator, its own peak): the process's
resident set before loading is the baseline; the models are loaded with the trainers'
loader (`cai.train.loading`), the peak-RSS counter is reset (/proc/self/clear_refs), two
AdamW steps run on random tokens (full fine-tuning, autocast to the dtype as the Trainer
does), and the peak (VmHWM) minus the baseline is compared with `plan_memory("sft", ...)`
for the same model, dtype, checkpointing, batch and length.

- `frozen`: the resident bytes a frozen model (a reference) adds once its weights have been
  read (an fp32 model may stay a view of its safetensors file), fp32 against bf16;
  `bf16_over_fp32_frozen` is their ratio on the embedded model;
- `train`: the peak of the steps; `checkpointing_over_none` is the embedded model's peak
  increase during the steps (over the resident set just before them) with checkpointing
  over without, in fp32; `plan_over_measured` per case.

    python benchmarks/bench_memory.py          # -> benchmarks/results/memory.json
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "memory.json"
SHAPES = {"tiny": dict(batch=4, seq=128), "embedded": dict(batch=2, seq=256)}


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def tiny_model(folder: Path) -> Path:
    """The tests' tiny model: a 2-layer random Llama with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cai.core.models import local_path

    if (folder / "model.safetensors").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(str(local_path("embedded:smollm2-135m")))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _warm_up(tiny: str, hw) -> None:
    """One load and training step of the tiny model, thrown away: the libraries' one-time
    memory (imports, kernels, autograd) is then in the baseline, not in the measurement."""
    import torch

    from cai.train.loading import autocast, load_model, prepare_for_training

    model = prepare_for_training(load_model(tiny, hw, trainable=True), hw, False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(5, 100, (1, 8))
    with autocast(hw, "cpu"):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    load_model(tiny, hw, trainable=False)
    del model, opt
    gc.collect()


def one(case: dict) -> dict:
    """Measure one case in this process."""
    import torch

    from cai.train.loading import HardwareConfig, autocast, load_model, prepare_for_training
    from cai.train.memory_plan import plan_memory
    from cai.train.sft import SFTConfig

    hw = HardwareConfig(dtype=case["dtype"], gradient_checkpointing=case["ckpt"])
    _warm_up(case["tiny"], hw)
    torch.manual_seed(0)
    gc.collect()
    base = _rss()
    if case["kind"] == "frozen":
        model = load_model(case["path"], hw, trainable=False)
        with torch.no_grad():  # weights kept as views of the file are resident once read
            sum(float(p.float().sum()) for p in model.parameters())
        gc.collect()
        held = _rss() - base
        tensors = sum(p.numel() * p.element_size() for p in model.parameters())
        return {**case, "measured_bytes": held, "tensor_bytes": tensors}
    model = prepare_for_training(load_model(case["path"], hw, trainable=True), hw, False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (case["batch"], case["seq"]),
                        generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = _rss()
    _reset_peak()
    for _ in range(2):
        with autocast(hw, "cpu"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _rss("VmHWM")
    cfg = SFTConfig(model=case["path"], lora=False, dtype=case["dtype"],
                    gradient_checkpointing=case["ckpt"], batch_size=case["batch"],
                    max_length=case["seq"])
    plan = plan_memory("sft", cfg)
    return {**case, "measured_peak_bytes": peak - base, "step_increase_bytes": peak - before,
            "plan_bytes": plan["total_bytes"], "plan_parts": plan["bytes"],
            "plan_over_measured": round(plan["total_bytes"] / (peak - base), 3)}


def run(case: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True,
                       text=True, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from cai.core.models import local_path

    paths = {"tiny": str(tiny_model(Path("/tmp/cai-bench-memory-tiny"))),
             "embedded": str(local_path("embedded:smollm2-135m"))}
    rows = []
    for name, path in paths.items():
        for dtype in ("float32", "bfloat16"):
            rows.append(run({"kind": "frozen", "model": name, "path": path, "dtype": dtype,
                             "ckpt": False, "tiny": paths["tiny"]}))
            for ckpt in (False, True):
                rows.append(run({"kind": "train", "model": name, "path": path, "dtype": dtype,
                                 "ckpt": ckpt, "tiny": paths["tiny"], **SHAPES[name]}))
            print(json.dumps(rows[-3:])[:400], file=sys.stderr)

    def pick(**kw):
        return next(r for r in rows if all(r.get(k) == v for k, v in kw.items()))

    frozen = {d: pick(kind="frozen", model="embedded", dtype=d)["measured_bytes"]
              for d in ("float32", "bfloat16")}
    steps = {c: pick(kind="train", model="embedded", dtype="float32", ckpt=c)["step_increase_bytes"]
             for c in (False, True)}
    emb = [r for r in rows if r["kind"] == "train" and r["model"] == "embedded"]
    res = {
        "bf16_over_fp32_frozen": round(frozen["bfloat16"] / frozen["float32"], 3),
        "checkpointing_over_none": round(steps[True] / steps[False], 3),
        "embedded_plan_over_measured": {f"{r['dtype']}{'_ckpt' if r['ckpt'] else ''}":
                                        r["plan_over_measured"] for r in emb},
        "embedded_plan_within_25pct": all(0.75 <= r["plan_over_measured"] <= 1.25 for r in emb),
        "command": "python benchmarks/bench_memory.py",
        "cases": rows,
    }
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "cases"}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one(json.loads(sys.argv[2]))))
    else:
        main()
