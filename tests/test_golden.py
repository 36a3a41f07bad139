"""Behaviour pinned across refactors, on any x86-64 machine.

A fixed tiny run (sl, sft, label, pm, rl on a tiny random model with fixed seeds) is compared
with what was recorded in `tests/fixtures/golden/`:

- exactly where the output does not depend on float rounding: record ids, prompts, sampled
  and revised texts, counts, which pair a label belongs to, flags;
- within a stated tolerance where it does: label log-probs and p, and trained weights, which
  are pinned by a compact summary of each tensor's update (its norm and four fixed random
  projections) rather than by bytes.

Each stage starts from recorded inputs, not from the previous stage's output in this run: SFT
trains on the recorded SL data, the PM on the recorded labels and SL pairs, label samples
from the initial model, and RL optimises the initial model against a fixed reward model built
here. So the rounding of one stage cannot cascade into every later stage. The initial models
are drawn with numpy's PCG64 generator, whose integer stream and normal draws do not depend on
the CPU's vector instructions (torch's `normal_` does).

To record new references, in a commit that means to change outputs:
`python -m tests.test_golden --record`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "golden"
CAI = str(Path(sys.executable).parent / "cai")

# Rounding across machines: the run on this repository's reference machine (AVX-512) against
# the same run under ATEN_CPU_CAPABILITY=default moved no update by more than 2e-4 of its norm
# and no label log-prob by more than 2e-6. The tolerances below leave a margin of 50x over
# that, and stay well below what a change of behaviour does: one optimizer step more or less,
# another learning rate or data order moves an update by tens of percent of its norm.
UPDATE_RTOL = 1e-2
"""Allowed change of an update's norm and projections, as a share of its recorded norm."""
UPDATE_ATOL = 1e-6
"""Absolute floor, so a tensor the stage does not touch (recorded update 0) stays untouched."""
FLOAT_ATOL = 1e-4
"""Allowed change of a float inside a record (log-probs are O(10), p is in [0, 1])."""
NEAR_HALF = 1e-3
"""A label with |p − ½| below this may swap chosen and rejected under other rounding."""

# The kernels a test run can be asked to use, emulating other machines: the generic build and
# AVX2 without AVX-512 (oneDNN and MKL held to the same instruction sets).
KERNELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}

SEED = "0"
STAGES: dict[str, list[str]] = {
    "sl": ["sl", "--prompts", "prompts.jsonl", "--model", "tiny", "--constitution", "harmless",
           "--limit", "3", "--rounds", "1", "--few-shot", "0", "--max-new-tokens", "8",
           "--min-words", "0", "--no-drop-cut-off", "--chunk-size", "2"],
    "sft": ["train", "sft", "--data", "in/sl/sft.jsonl", "--model", "tiny", "--max-steps", "2",
            "--batch-size", "2", "--max-length", "128", "--save-steps", "1"],
    "label": ["label", "--prompts", "prompts.jsonl", "--policy", "tiny", "--feedback-model",
              "hf:tiny?progress=0", "--constitution", "harmless", "--principles", "2",
              "--limit", "3", "--max-new-tokens", "8", "--chunk-size", "2"],
    "pm": ["train", "pm", "--preferences", "in/label/preferences.jsonl", "--pairs",
           "in/sl/pairs.jsonl", "--model", "tiny", "--max-steps", "2", "--batch-size", "2",
           "--max-length", "128", "--eval-fraction", "0.34", "--save-steps", "1"],
    "rl": ["train", "rl", "--algo", "ppo", "--model", "tiny", "--reward", "pm:reward",
           "--prompts", "prompts.jsonl", "--constitution", "harmless", "--limit", "4",
           "--steps", "2", "--batch-size", "2", "--minibatch-size", "2", "--ppo-epochs", "1",
           "--max-new-tokens", "8", "--save-every", "1"],
}
RECORDS = {"sl": ("data.jsonl", "pairs.jsonl", "sft.jsonl"),
           "label": ("data.jsonl", "preferences.jsonl", "responses.jsonl")}
MODELS = ("sft", "pm", "rl")


# --------------------------------------------------------------------------- inputs


def _draw(rng: Any, shape: tuple[int, ...]) -> Any:
    import torch

    return torch.from_numpy(rng.normal(0.0, 0.02, size=shape).astype("float32"))


def build_inputs(root: Path, embedded: Path) -> None:
    """The run's recorded inputs in `root`: the initial model `tiny`, a reward model `reward`
    on the same body, the prompts, and the recorded SL and label outputs under `in/`."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(embedded))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    rng = np.random.Generator(np.random.PCG64(0))
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(torch.ones_like(param) if name.endswith("norm.weight")
                        else _draw(rng, tuple(param.shape)))
    model.save_pretrained(str(root / "tiny"))
    tok.save_pretrained(str(root / "tiny"))
    pm = LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1}))
    with torch.no_grad():
        pm.model.load_state_dict(model.model.state_dict())
        pm.score.weight.copy_(_draw(rng, tuple(pm.score.weight.shape)) * 50)
    pm.save_pretrained(str(root / "reward"))
    tok.save_pretrained(str(root / "reward"))
    shutil.copy(FIXTURE / "prompts.jsonl", root / "prompts.jsonl")
    shutil.copytree(FIXTURE, root / "in", ignore=shutil.ignore_patterns("models.json"))


def run_stage(root: Path, stage: str, out: str, kernels: str = "native") -> Path:
    """One stage as a user runs it: a fresh `cai` process, one thread (a thread count changes
    how a float sum is split, and with it the last bits)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **KERNELS[kernels]}
    done = subprocess.run([CAI, *STAGES[stage], "--seed", SEED, "--out", out], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{stage}: {done.stderr[-2000:]}"
    return root / out


# --------------------------------------------------------------------------- summaries


def _without_clock(value: Any) -> Any:
    """A record less its `created` time: the one field that differs between two runs."""
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def read_records(path: Path) -> list[Any]:
    return [_without_clock(json.loads(x)) for x in path.read_text(encoding="utf-8").splitlines()
            if x.strip()]


def _signs(name: str, n: int) -> Any:
    """Four fixed ±1 vectors for a tensor, from integers (exact on every machine)."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    bits = np.random.Generator(np.random.PCG64(seed)).integers(0, 2, size=(4, n), dtype=np.int8)
    return bits.astype(np.float64) * 2 - 1


def update_summary(model: Path, init: Path) -> dict[str, dict[str, Any]]:
    """Per tensor: the norm of its update (trained − initial; the tensor itself where the
    initial model has no such tensor, e.g. a PM's score head) and its projections onto four
    fixed random sign vectors."""
    import numpy as np
    from safetensors.numpy import load_file

    start = load_file(str(init / "model.safetensors"))
    out: dict[str, dict[str, Any]] = {}
    for name, w in sorted(load_file(str(model / "model.safetensors")).items()):
        base = start.get(name)
        delta = w.astype(np.float64).ravel()
        if base is not None and base.shape == w.shape:
            delta = delta - base.astype(np.float64).ravel()
        out[name] = {"norm": float(np.linalg.norm(delta)),
                     "proj": [float(x) for x in _signs(name, delta.size) @ delta]}
    return out


# --------------------------------------------------------------------------- comparisons


def compare_records(got: Any, want: Any, where: str, problems: list[str]) -> None:
    """Exact on everything but floats, which may move by FLOAT_ATOL."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            problems.append(f"{where}: keys {sorted(set(got) ^ set(want))} differ")
            return
        swap_ok = isinstance(want.get("p_a", want.get("p_chosen")), float) and abs(
            want.get("p_a", want.get("p_chosen")) - 0.5) < NEAR_HALF
        for k in want:
            if swap_ok and k in ("chosen", "rejected"):
                if sorted(map(json.dumps, (got["chosen"], got["rejected"]))) != sorted(
                        map(json.dumps, (want["chosen"], want["rejected"]))):
                    problems.append(f"{where}.{k}: not the recorded pair")
                continue
            compare_records(got[k], want[k], f"{where}.{k}", problems)
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            problems.append(f"{where}: {len(got)} items, recorded {len(want)}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            compare_records(g, w, f"{where}[{i}]", problems)
    elif isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if not math.isclose(got, want, rel_tol=0, abs_tol=FLOAT_ATOL):
            problems.append(f"{where}: {got!r}, recorded {want!r}")
    elif got != want:
        problems.append(f"{where}: {str(got)[:80]!r}, recorded {str(want)[:80]!r}")


def compare_updates(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]],
                    where: str, problems: list[str]) -> None:
    if set(got) != set(want):
        problems.append(f"{where}: tensors {sorted(set(got) ^ set(want))} differ")
        return
    for name, ref in want.items():
        tol = UPDATE_RTOL * ref["norm"] + UPDATE_ATOL
        g = got[name]
        worst = max([abs(g["norm"] - ref["norm"])]
                    + [abs(a - b) for a, b in zip(g["proj"], ref["proj"])])
        if worst > tol:
            problems.append(f"{where} {name}: moved {worst:.3g} from the recorded update "
                            f"(norm {ref['norm']:.3g}, tolerance {tol:.3g})")


def check_run(root: Path, kernels: str) -> list[str]:
    """Run every stage from the recorded inputs in `root`; what differs from the record."""
    problems: list[str] = []
    for stage in STAGES:
        run_stage(root, stage, stage, kernels)
    for stage, files in RECORDS.items():
        for name in files:
            compare_records(read_records(root / stage / name),
                            read_records(FIXTURE / stage / name), f"{stage}/{name}", problems)
    models = json.loads((FIXTURE / "models.json").read_text())
    for stage in MODELS:
        compare_updates(update_summary(root / stage, root / "tiny"), models[stage], stage, problems)
    return problems


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_golden_run_matches_the_record(kernels: str, embedded_path: Path, tmp_path: Path) -> None:
    """Every stage behaves as recorded, natively and under the kernels of other machines."""
    build_inputs(tmp_path, embedded_path)
    problems = check_run(tmp_path, kernels)
    assert not problems, "\n".join(problems[:20])


def test_golden_same_machine_same_bytes(embedded_path: Path, tmp_path: Path) -> None:
    """On one machine with the same versions a rerun writes the same bytes: the records
    (less their clock) and the trained weights."""
    build_inputs(tmp_path, embedded_path)
    for stage in ("label", "pm"):
        first = run_stage(tmp_path, stage, f"{stage}-1")
        second = run_stage(tmp_path, stage, f"{stage}-2")
        for f in sorted(first.glob("*.jsonl")):
            if f.name != "log.jsonl":  # the step log holds timings
                assert read_records(f) == read_records(second / f.name), f
        assert (first / "model.safetensors").exists() == (stage == "pm")
        if stage == "pm":
            assert (first / "model.safetensors").read_bytes() == (
                second / "model.safetensors").read_bytes()


def test_golden_comparison_fails_on_a_changed_update(embedded_path: Path, tmp_path: Path) -> None:
    """The tolerances are tight enough to see a change of behaviour: SFT with one more
    optimizer step, or another learning rate, no longer matches the record."""
    build_inputs(tmp_path, embedded_path)
    want = json.loads((FIXTURE / "models.json").read_text())["sft"]
    base = list(STAGES["sft"])
    for extra in (["--max-steps", "3"], ["--learning-rate", "1e-4"]):
        STAGES["sft"] = base + extra
        try:
            out = run_stage(tmp_path, "sft", "sft-" + extra[1])
        finally:
            STAGES["sft"] = base
        problems: list[str] = []
        compare_updates(update_summary(out, tmp_path / "tiny"), want, "sft", problems)
        assert problems, extra


def record() -> None:
    """Run the golden stages here and write their outputs as the new record."""
    import tempfile

    from cai.core.models import local_path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_inputs(root, local_path("embedded:smollm2-135m"))
        for stage in STAGES:  # in order: the recorded SL and label outputs feed sft and pm
            run_stage(root, stage, stage)
            for name in RECORDS.get(stage, ()):
                for folder in (FIXTURE / stage, root / "in" / stage):
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(root / stage / name, folder / name)
        models = {stage: update_summary(root / stage, root / "tiny") for stage in MODELS}
        (FIXTURE / "models.json").write_text(json.dumps(models, indent=1) + "\n")
    print(f"recorded into {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_golden --record")
    record()
