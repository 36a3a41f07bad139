"""The stage contract: resume pairs only this run's data, seeds ignore batching, ids ignore
speed options, one registry, one manifest, clear errors for bad backend options."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cai.backends import GenerationConfig, GenRequest
from cai.core.errors import CaiError
from cai.core.models import model_identity
from cai.core.stage import REGISTRY, load_registry, read_manifest, write_manifest
from cai.judge import JudgeConfig, Judgement, label_flags, label_stats
from cai.judge import split_reasoning as split
from cai.label import LabelConfig, run_label

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")
PROMPTS = ["How do I pick a lock?", "Write a rude joke about my boss.", "What is a good pasta recipe?"]


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return p


def _pairs(tmp_path: Path, n: int = 5) -> Path:
    p = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "response_a": f"Answer {i} one.",
             "response_b": f"A different answer number {i}."} for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# ----------------------------------------------------------------------------- resume


def test_label_rerun_with_another_seed_pairs_only_its_own_responses(tmp_path, tiny_model) -> None:
    spec = f"hf:{tiny_model}?progress=0"
    base = dict(prompts=str(_prompts(tmp_path)), policy=spec, feedback_model=spec,
                constitution=str(MINIMAL), judge=JudgeConfig(principles=2), max_new_tokens=6,
                out=str(tmp_path / "lab"))
    first = run_label(LabelConfig(**base, seed=1))
    assert first["counts"] == {"records": 3, "new": 3}
    responses = [json.loads(x) for x in (tmp_path / "lab" / "responses.jsonl").read_text().splitlines()]
    first_texts = {r["text"] for r in responses}
    second = run_label(LabelConfig(**base, seed=2))
    assert second["counts"] == {"records": 3, "new": 3}  # 3 prompts x one pair, only seed 2's
    responses = [json.loads(x) for x in (tmp_path / "lab" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 12
    new_texts = {r["text"] for r in responses if r["seed"] == 2}
    prefs = [json.loads(x) for x in (tmp_path / "lab" / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 3
    for p in prefs:
        texts = {p["chosen"][0]["content"], p["rejected"][0]["content"]}
        assert texts <= new_texts and not texts <= first_texts - new_texts
    # The same seed again resumes: nothing is sampled or labelled twice.
    again = run_label(LabelConfig(**base, seed=2))
    assert again["counts"] == {"records": 3, "new": 0}
    assert len((tmp_path / "lab" / "responses.jsonl").read_text().splitlines()) == 12


def test_speed_options_do_not_change_ids(tmp_path, tiny_model) -> None:
    pairs = _pairs(tmp_path)
    common = dict(pairs=str(pairs), constitution=str(MINIMAL), judge=JudgeConfig(principles=2),
                  out=str(tmp_path / "l"))
    m1 = run_label(LabelConfig(**common, feedback_model=f"hf:{tiny_model}?batch_size=4&progress=0"))
    assert m1["counts"]["new"] == 5
    m2 = run_label(LabelConfig(**common, feedback_model=f"hf:{tiny_model}?batch_size=16"))
    assert m2["counts"] == {"records": 5, "new": 0}
    assert m2["models"]["feedback"] == f"hf:{tiny_model}"
    # An option that changes outputs is part of the identity, so it labels anew.
    m3 = run_label(LabelConfig(**common, feedback_model=f"hf:{tiny_model}?chat=0&batch_size=4"))
    assert m3["counts"]["new"] == 5


def test_model_identity() -> None:
    assert model_identity("hf:/m?batch_size=4&progress=0&device=cpu") == "hf:/m"
    assert model_identity("hf:/m?dtype=bfloat16&batch_size=2") == "hf:/m?dtype=bfloat16"
    assert model_identity("openai:http://h/v1#m?concurrency=3&api_key=secret") == "openai:http://h/v1#m"
    assert model_identity("embedded:smollm2-135m") == "embedded:smollm2-135m"


# ----------------------------------------------------------------------------- seeds


def test_sampled_text_ignores_batch_size_and_order(tiny_model) -> None:
    from cai.backends.hf import HFBackend, HFOptions

    reqs = [GenRequest([{"role": "user", "content": f"Tell me about topic {i}" + " please" * (i % 4)}],
                       "", seed=100 + i) for i in range(10)]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    texts = {}
    model = tok = None
    for bs in (1, 3, 16):
        b = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(batch_size=bs, progress=False),
                      model=model, tokenizer=tok)
        model, tok = b.model, b.tok
        texts[bs] = [g.text for g in b.generate(reqs, cfg)]
    assert texts[1] == texts[3] == texts[16]
    order = list(range(10))
    random.Random(0).shuffle(order)
    shuffled = b.generate([reqs[i] for i in order], cfg)
    assert [shuffled[order.index(i)].text for i in range(10)] == texts[1]
    # Seeds matter: another request seed or base seed gives other text.
    other = b.generate([GenRequest(r.chat, "", r.seed + 1) for r in reqs], cfg)
    assert [g.text for g in other] != texts[1]
    # Greedy decoding is unaffected by seeds.
    greedy = GenerationConfig(max_new_tokens=8, temperature=0.0, seed=7)
    assert [g.text for g in b.generate(reqs, greedy)] == [g.text for g in b.generate(
        [GenRequest(r.chat, "", 0) for r in reqs], greedy)]


# ----------------------------------------------------------------------------- judging


def test_cot_reasoning_split() -> None:
    both = "Option (A) is rude and (B) is kind. Therefore, the answer is (B)."
    assert split(both) == "Option (A) is rude and (B) is kind."
    only_other = "(B) explains the risk without giving instructions. The answer is (B)"
    assert split(only_other) == "(B) explains the risk without giving instructions."
    assert split("No commitment here, (A) seems fine") == "No commitment here, (A) seems fine"
    assert split("So the final answer is: (A)") == ""


def _j(order: str, p_first: float, mass: float = 0.9, principle: str = "p") -> Judgement:
    return Judgement(principle=principle, order=order, logprob_a=-1.0, logprob_b=-1.0, mass=mass,
                     p_first=p_first)


def test_label_flags_set_and_unset() -> None:
    cfg = JudgeConfig(tie_threshold=0.05, low_mass_threshold=0.5)
    # Both orders prefer the same response (a): p_first 0.8 in ab, 0.2 in ba -> consistent.
    consistent = [_j("ab", 0.8), _j("ba", 0.2)]
    assert label_flags(consistent, 0.8, cfg) == []
    # Both orders pick letter A: the orders disagree about which response is better.
    inconsistent = [_j("ab", 0.8), _j("ba", 0.8)]
    assert "position-inconsistent" in label_flags(inconsistent, 0.5, cfg)
    assert label_flags(inconsistent, 0.5, cfg) == ["position-inconsistent", "tie"]
    assert "low-mass" in label_flags([_j("ab", 0.9, 0.1), _j("ba", 0.1, 0.2)], 0.9, cfg)
    assert "tie" not in label_flags(consistent, 0.6, cfg)
    assert "tie" in label_flags(consistent, 0.52, cfg)
    truncated = [_j("ab", 0.8).model_copy(update={"truncated": True}), _j("ba", 0.2)]
    assert "truncated-choices" in label_flags(truncated, 0.8, cfg)


def test_label_stats_on_known_records() -> None:
    recs = [{"p_a": 0.9, "flags": [], "judgements": [{"mass": 0.8}, {"mass": 0.6}]},
            {"p_a": 0.5, "flags": ["tie", "position-inconsistent"], "judgements": [{"mass": 0.2}]},
            {"p_a": 0.2, "flags": ["low-mass"], "judgements": [], "rating_mass": 0.4}]
    stats = label_stats(recs)
    assert stats == {"pairs": 3, "position_inconsistency_rate": 0.3333,
                     "mean_abs_p_minus_half": round((0.4 + 0 + 0.3) / 3, 4),
                     "low_mass_rate": 0.3333, "tie_rate": 0.3333,
                     "mean_mass": round((0.8 + 0.6 + 0.2 + 0.4) / 4, 4)}


def test_score_mode_manifest_is_valid_json_and_keeps_prompts(tmp_path, tiny_model) -> None:
    out = tmp_path / "score"
    m = run_label(LabelConfig(pairs=str(_pairs(tmp_path, 2)), constitution=str(MINIMAL),
                              judge=JudgeConfig(principles=1, mode="score", keep_prompts=True,
                                                low_mass_threshold=0.99),
                              feedback_model=f"hf:{tiny_model}?progress=0", out=str(out)))
    text = (out / "manifest.json").read_text()
    assert "NaN" not in text and json.loads(text)["label_stats"]["mean_mass"] == m["label_stats"]["mean_mass"]
    rec = json.loads((out / "data.jsonl").read_text().splitlines()[0])
    assert len(rec["rating_prompts"]) == 2 and "Rate the assistant" in rec["rating_prompts"][0]
    assert rec["rating_mass"] < 0.99 and "low-mass" in rec["flags"]  # a random model barely rates


# ----------------------------------------------------------------------------- manifests


def test_registry_and_manifest_lineage(tmp_path) -> None:
    stages = load_registry()
    assert {"sl", "label", "sft", "eval-labeler", "eval-constitutions"} <= set(stages)
    assert [(i.field, i.kind) for i in REGISTRY["label"].reads] == [
        ("pairs", "pairs"), ("prompts", "red-team-prompts"), ("policy", "policy"),
        ("feedback_model", "judge-model"), ("constitution", "constitution")]
    up = tmp_path / "label"
    up.mkdir()
    (up / "preferences.jsonl").write_text('{"id": "1"}\n')
    stamp = {"name": "harmless", "version": "1.2.0", "hash": "sha256:abc"}
    write_manifest(up, "label", config={"seed": 0}, constitution=stamp,
                   data=("preferences.jsonl",))

    down = tmp_path / "pm"
    down.mkdir()
    cfg = {"preferences": str(up / "preferences.jsonl"), "lr": float("nan")}
    m = write_manifest(down, "pm", config=cfg, inputs=("preferences",), data=())
    assert m["config"]["lr"] is None  # NaN never reaches manifest.json
    assert m["constitution"] == stamp  # inherited from the upstream data
    assert m["upstream"]["preferences"]["stage"] == "label"
    assert m["upstream"]["preferences"]["data_sha256"].startswith("sha256:")
    assert read_manifest(down).as_dict()["upstream"] == m["upstream"]


def test_declared_inputs_are_config_fields_and_reach_the_manifest(tmp_path, monkeypatch) -> None:
    """A stage may only declare fields its config has (caught at registration), and
    write_manifest lists every declared input, models included, without being told."""
    from dataclasses import dataclass

    from cai.core import stage as st
    from cai.core.stage import Input, Output, Stage, register

    monkeypatch.setattr(st, "REGISTRY", dict(st.REGISTRY))  # the test stages go afterwards
    monkeypatch.setattr(st, "_RUNS", dict(st._RUNS))

    @dataclass
    class Cfg:
        model: str = "x"
        out: str = "o"

    with pytest.raises(RuntimeError, match="declares input 'modle'"):
        register(Stage("test.typo", Cfg, lambda c: {}, "t", inputs=(Input("modle", "policy"),)))
    up = tmp_path / "sft"
    up.mkdir()
    (up / "model.safetensors").write_bytes(b"weights")
    stamp = {"name": "harmless", "version": "1.0.0", "hash": "sha256:abc"}
    write_manifest(up, "sft", config={"seed": 0}, constitution=stamp,
                   data=("model.safetensors",))
    register(Stage("test.policy-user", Cfg, lambda c: {}, "t", inputs=(Input("model", "policy"),),
                   outputs=(Output("policy"),)))
    m = write_manifest(tmp_path / "rl", "test.policy-user", config=Cfg(model=f"hf:{up}"), data=())
    assert m["upstream"]["model"]["stage"] == "sft"
    assert m["upstream"]["model"]["data_sha256"] == read_manifest(up).data.sha256
    assert m["constitution"] == stamp  # inherited through the model, not only through data
    bare = write_manifest(tmp_path / "bare", "test.unregistered", config=Cfg(model=f"hf:{up}"),
                          data=())
    assert bare["upstream"] == {} and bare["constitution"] is None  # nothing declared, none read


# ----------------------------------------------------------------------------- stage names


def _rename_recorded(folder: Path, old: str) -> None:
    """Make a folder look as if written before its stage was renamed: the old name in its
    manifest and in its ownership marker."""
    m = json.loads((folder / "manifest.json").read_text())
    m["stage"] = old
    (folder / "manifest.json").write_text(json.dumps(m))
    (folder / ".cai-stage").write_text(old + "\n")


def test_one_name_per_stage_and_the_old_names_map_onto_them() -> None:
    from cai.core.folders import RENAMED, stage_name

    stages = load_registry()
    assert set(RENAMED.values()) <= set(stages) and not set(RENAMED) & set(stages)
    assert {"sl", "sft", "label", "pm", "rl", "dpo", "eval"} == {
        n for n, st in stages.items() if st.pipeline}
    assert stage_name("train.pm") == "pm" and stage_name("pm") == "pm" and stage_name(None) is None
    # The command line still spells each stage as before.
    assert {n: st.command or n for n, st in stages.items()} == {
        "sl": "sl", "sft": "train sft", "label": "label", "pm": "train pm", "rl": "train rl",
        "dpo": "train dpo", "eval": "eval policies", "eval-labeler": "eval labeler",
        "eval-constitutions": "eval constitutions", "eval-known-answer": "eval known-answer"}


def test_folder_written_under_an_old_stage_name_still_resumes(tmp_path, tiny_backend) -> None:
    """A real stage reruns into its folder after the folder's recorded name was the old one;
    another stage is still refused that folder, under either name."""
    from cai.evaluate.labeler import LabelerEvalConfig, run_labeler_eval

    rows = [{"id": f"i{k}", "context": f"Question {k}?", "options": [f"good {k}", f"bad {k}"],
             "correct": k % 2} for k in range(4)]
    items = tmp_path / "ab.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev"
    cfg = LabelerEvalConfig(items=str(items), constitution=str(MINIMAL),
                            judge=JudgeConfig(principles=1), out=str(out))
    first = run_labeler_eval(cfg, tiny_backend)
    assert first["stage"] == "eval-labeler"
    _rename_recorded(out, "eval.labeler")
    assert read_manifest(out).stage == "eval-labeler"  # read through the table
    again = run_labeler_eval(cfg, tiny_backend)  # accepted: no "holds the output of" error
    assert again["stage"] == "eval-labeler" and again["metrics"] == first["metrics"]
    _rename_recorded(out, "eval.labeler")
    with pytest.raises(CaiError, match="holds the output of stage `eval-labeler`"):
        run_label(LabelConfig(pairs=str(_pairs(tmp_path)), constitution=str(MINIMAL),
                              judge=JudgeConfig(principles=1), out=str(out)), tiny_backend)
    assert not (out / "data.jsonl").exists()  # refused before writing anything


def test_old_training_folder_is_finished_upstream_and_shown(tmp_path) -> None:
    """A training folder recorded as `train.pm`: its rerun is still recognised as finished,
    a downstream manifest names it `pm`, the viewer lists it under `pm`; an SFT run is
    refused it, and an SFT folder recorded as `train.sft` is refused to the PM."""
    from dataclasses import dataclass

    from cai.core.stage import claim_dir, finished_run
    from cai.view.runs import Run

    @dataclass
    class Cfg:
        seed: int = 0

    run = tmp_path / "run"
    pm = run / "pm"
    claim_dir(pm, "pm")
    for name in ("config.json", "model.safetensors"):
        (pm / name).write_text("{}")
    write_manifest(pm, "pm", config=Cfg(), data=("model.safetensors",))
    assert finished_run(pm, Cfg(), "pm") is not None
    _rename_recorded(pm, "train.pm")
    assert finished_run(pm, Cfg(), "pm")["stage"] == "pm"
    assert finished_run(pm, Cfg(seed=1), "pm") is None  # another config still trains again
    claim_dir(pm, "pm")  # accepted
    with pytest.raises(CaiError, match="holds the output of stage `pm`; give `sft`"):
        claim_dir(pm, "sft")
    down = write_manifest(run / "rl", "rl", config={"reward": f"pm:{pm}"}, inputs=("reward",),
                          data=())
    assert down["upstream"]["reward"]["stage"] == "pm"
    assert [s.key for s in Run(run).of("pm")] == ["pm"]
    sft = tmp_path / "sft"
    claim_dir(sft, "sft")
    (sft / ".cai-stage").write_text("train.sft\n")
    claim_dir(sft, "sft")
    with pytest.raises(CaiError, match="holds the output of stage `sft`"):
        claim_dir(sft, "pm")


# ----------------------------------------------------------------------------- CLI


def _cai(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("spec, needle", [
    ("hf:{m}?batch_size=many", "hf option batch_size: expected int"),
    ("hf:{m}?colour=blue", "unknown hf option 'colour'"),
    ("hf:{m}?batch_size=0", "batch_size: must be at least 1"),
    ("hf:{m}?dtype=int3", "dtype: unknown 'int3'"),
    ("hf:{m}?progress=maybe", "progress: expected bool"),
    ("hf:{m}?scoring=fast", "hf option scoring: use packed or trie"),
    ("hf:{m}?pack_tokens=8", "pack_tokens: must be at least 16"),
    ("hf:{m}?prefix_cache_mb=-1", "prefix_cache_mb: must be >= 0"),
    ("vllm:{m}?kv_cache_gb=-1", "kv_cache_gb and max_num_seqs must be >= 0"),
    ("vllm:{m}?tensor_parallel_size=two", "vllm option tensor_parallel_size: expected int"),
    ("vllm:{m}?speed=9", "unknown vllm option 'speed'"),
    ("openai:http://127.0.0.1:9/v1#m?concurrency=many", "openai option concurrency: expected int"),
    ("openai:http://127.0.0.1:9/v1#m?retries=-1", "retries >= 0"),
    ("openai:http://127.0.0.1:9/v1#m?colour=red", "unknown openai option 'colour'"),
])
def test_bad_backend_options_are_one_line_errors(tmp_path, tiny_model, spec, needle) -> None:
    out = tmp_path / "out"
    r = _cai("label", "--pairs", str(_pairs(tmp_path, 1)), "--constitution", str(MINIMAL),
             "--principles", "1", "--feedback-model", spec.format(m=tiny_model), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("error:")]) == 1
    assert not (out / "data.jsonl").exists()


def test_defaults_work_from_an_empty_folder(tmp_path, tiny_model) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    spec = f"hf:{tiny_model}?progress=0"
    r = _cai("sl", "--model", spec, "--limit", "1", "--rounds", "1", "--few-shot", "0",
             "--max-new-tokens", "4", "--out", "sl", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "using the shipped constitution 'harmless'" in r.stderr
    assert "using the shipped prompt 'red_team'" in r.stderr
    m = json.loads((cwd / "sl" / "manifest.json").read_text())
    assert m["constitution"]["name"] == "harmless" and m["counts"]["records"] == 1
    r = _cai("label", "--pairs", str(_pairs(tmp_path, 1)), "--feedback-model", spec,
             "--principles", "1", "--out", "label", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "using the shipped constitution 'harmless'" in r.stderr
    # A folder belongs to one stage: labelling into the SL folder is refused, nothing changes.
    before = (cwd / "sl" / "manifest.json").read_text()
    r = _cai("label", "--pairs", str(_pairs(tmp_path, 1)), "--feedback-model", spec,
             "--principles", "1", "--out", "sl", cwd=cwd)
    assert r.returncode == 2 and "holds the output of stage `sl`" in r.stderr
    assert (cwd / "sl" / "manifest.json").read_text() == before


def test_config_file_run(tmp_path, tiny_model) -> None:
    cfg = tmp_path / "label.yaml"
    out = tmp_path / "from-config"
    cfg.write_text(f"pairs: {_pairs(tmp_path, 2)}\nconstitution: {MINIMAL}\n"
                   "judge:\n  principles: 1\n  orders: one\n"
                   f"feedback_model: hf:{tiny_model}?progress=0\nout: {out}\nseed: 5\n")
    r = _cai("label", "--config", str(cfg), "--principles", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    judge = m["config"]["judge"]
    assert m["config"]["seed"] == 5 and judge["principles"] == 2  # the flag wins
    assert judge["orders"] == "one"  # ...over that one judge field only
    assert m["counts"]["records"] == 2


def test_export_missing_and_bad_files(tmp_path) -> None:
    r = _cai("export", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "nope.jsonl: file not found" in r.stderr
    no_id = tmp_path / "noid.jsonl"
    no_id.write_text('{"id": "1"}\n{"text": "x"}\n')
    r = _cai("export", str(no_id), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and f"{no_id}:2: id: missing" in r.stderr
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": "1"}\n{"id": "2", "te')
    before = torn.read_bytes()
    r = _cai("export", str(torn), "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and f"{torn}:2" in r.stderr
    assert torn.read_bytes() == before  # the user's own file is never truncated


def test_judge_config_validates() -> None:
    with pytest.raises(CaiError, match="mode"):
        JudgeConfig(mode="vibes")
    with pytest.raises(CaiError, match="chunk_size"):
        LabelConfig(pairs="x", chunk_size=-1)
    with pytest.raises(CaiError, match="limit"):
        LabelConfig(pairs="x", limit=0)
