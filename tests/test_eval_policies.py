"""`cai eval policies`: Bradley–Terry Elo with bootstrap intervals, win rates, refusal
rates, best-of-k with a reward model, and a resumable end-to-end run on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cai.core.config import from_dict
from cai.core.errors import CaiError
from cai.evaluate.answers import best_of_pick, refusal_rate
from cai.evaluate.elo import (
    bootstrap_intervals,
    elo_ratings,
    expected_score,
    win_rate_matrix,
    win_rate_vs_field,
)
from cai.evaluate.evidence import rl_points
from cai.evaluate.policies import PoliciesEvalConfig, parse_models, run_policies_eval
from cai.judge import JudgeConfig

from .conftest import MINIMAL

TRUE = {"base": 1000.0, "weak": 850.0, "good": 1150.0, "best": 1350.0}


def _simulate(n: int, seed: int) -> list[tuple[str, str, float]]:
    """n games between random pairs, won with the Bradley–Terry probability of TRUE."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    games = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        games.append((a, b, float(rng.random() < expected_score(TRUE[a], TRUE[b]))))
    return games


# ----------------------------------------------------------------------------- Elo


def test_elo_recovers_known_order_and_anchor() -> None:
    games = _simulate(1500, seed=1)
    r = elo_ratings(games, list(TRUE))
    assert r["base"] == pytest.approx(1000.0)
    assert sorted(r, key=r.get) == sorted(TRUE, key=TRUE.get)
    for name in TRUE:
        assert abs(r[name] - TRUE[name]) < 60, r


def test_soft_wins_give_the_logit_gap() -> None:
    # a's answer is judged better with p = 0.7 every time: the fit's gap is 400·log10(0.7/0.3).
    r = elo_ratings([("a", "b", 0.7)] * 2000)
    assert r["a"] == 1000.0
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(0.7 / 0.3), rel=1e-3)
    # Winning every game gives a big but finite gap (the prior keeps it finite).
    sweep = elo_ratings([("a", "b", 1.0)] * 10)
    assert 300 < sweep["a"] - sweep["b"] < 2000


def test_bootstrap_contains_estimate_and_narrows_with_more_games() -> None:
    small, large = _simulate(200, seed=2), _simulate(2000, seed=3)
    widths = {}
    for label, games in (("small", small), ("large", large)):
        r = elo_ratings(games, list(TRUE))
        ci = bootstrap_intervals(games, n_boot=200, seed=0, models=list(TRUE))
        assert ci["base"] == pytest.approx((1000.0, 1000.0))  # the anchor does not move
        for name in TRUE:
            lo, hi = ci[name]
            assert lo - 1e-9 <= r[name] <= hi + 1e-9, (label, name, lo, r[name], hi)
        widths[label] = {n: ci[n][1] - ci[n][0] for n in TRUE if n != "base"}
    for name in widths["large"]:
        # 10× the games: about √10 ≈ 3.2× narrower; require at least 2×.
        assert widths["large"][name] < widths["small"][name] / 2, widths


def test_bootstrap_by_group_is_seeded() -> None:
    games = _simulate(300, seed=4)
    groups = [k // 6 for k in range(len(games))]
    a = bootstrap_intervals(games, 50, seed=7, groups=groups)
    assert a == bootstrap_intervals(games, 50, seed=7, groups=groups)
    assert a != bootstrap_intervals(games, 50, seed=8, groups=groups)


def test_win_rates_by_hand() -> None:
    games = [("x", "y", 1.0), ("y", "x", 0.25), ("x", "z", 0.5)]
    m = win_rate_matrix(games, ["x", "y", "z"])
    assert m["x"]["y"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["y"]["x"] == pytest.approx(0.125)
    assert m["x"]["z"] == 0.5 and m["y"]["z"] is None
    assert win_rate_matrix(games, hard=True)["x"]["y"] == 1.0
    field = win_rate_vs_field(games)
    assert field["x"] == pytest.approx((1.0 + 0.75 + 0.5) / 3) and field["z"] == 0.5
    with pytest.raises(ValueError):
        elo_ratings([("x", "x", 1.0)])
    with pytest.raises(ValueError):
        win_rate_matrix([("x", "y", 1.5)])


# ----------------------------------------------------------------------------- pure helpers


def test_refusal_rate_on_hand_written_answers() -> None:
    benign = ["I'm sorry, but I can't help with that.",          # refusal, bare
              "Use `kill -9 PID`, or `pkill name` to stop it by name.",
              "I cannot assist with that request because it could hurt someone; instead, "
              "consider asking a professional.",                  # refusal, explained
              "As an AI language model, I must decline."]        # refusal, bare
    assert refusal_rate(benign) == pytest.approx(3 / 4)
    assert refusal_rate(benign, bare=True) == pytest.approx(2 / 4)
    assert refusal_rate(["Sure: open Task Manager and end the task."]) == 0.0
    assert refusal_rate([]) is None


def test_best_of_pick_and_model_parsing() -> None:
    assert best_of_pick([0.1, 2.0, -3.0, 2.0]) == 1  # the first of equal maxima
    assert parse_models(" base=embedded:smollm2-135m , rl=hf:/m?dtype=bfloat16") == {
        "base": "embedded:smollm2-135m", "rl": "hf:/m?dtype=bfloat16"}
    for bad, needle in (("base", "name=SPEC"), ("a=x,a=y", "twice"), ("feedback=x,b=y", "reserved"),
                        ("best-of-4=x,b=y", "reserved"), ("a=", "no model spec")):
        with pytest.raises(CaiError, match=needle):
            parse_models(bad)


def test_config_validation() -> None:
    with pytest.raises(CaiError, match="two players") as e:
        PoliciesEvalConfig(models="a=x")
    assert e.value.field == "models"
    PoliciesEvalConfig(models="a=x", reward="pm:somewhere")  # best-of-k is the second player
    with pytest.raises(CaiError) as e:
        PoliciesEvalConfig(models="a=x,b=y", best_of_base="c")
    assert e.value.field == "best_of_base"
    with pytest.raises(CaiError) as e:
        PoliciesEvalConfig(models="a=x", reward="pm:p", temperature=0.0)
    assert e.value.field == "temperature"
    for field, value in (("limit", 0), ("best_of_k", -1), ("n_boot", -1), ("chunk_size", 0)):
        with pytest.raises(CaiError) as e:
            PoliciesEvalConfig(models="a=x,b=y", **{field: value})
        assert e.value.field == field
    for field, value in (("orders", "three"), ("principles", 0)):  # the nested judge's fields
        with pytest.raises(CaiError) as e:
            from_dict(PoliciesEvalConfig, {"models": "a=x,b=y", "judge": {field: value}})
        assert e.value.field == f"judge.{field}"


def test_rl_points(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in (
        {"step": 1, "reward_mean": 0.0, "kl": 0.0, "sqrt_kl": 0.0},
        {"step": 2, "reward_mean": 1.0, "kl": 4.0},  # sqrt computed from kl
        {"step": 3, "loss": 0.3})))                  # no reward: skipped
    rl = rl_points(tmp_path)
    assert [(p["sqrt_kl"], p["reward"]) for p in rl["points"]] == [(0.0, 0.0), (2.0, 1.0)]
    assert rl["slope_reward_per_sqrt_kl"] == pytest.approx(0.5)
    # Step order whatever the file order; k3 when given; a negative k1 mean is left out,
    # not clamped to a false point at sqrt(KL) = 0.
    log.write_text("".join(json.dumps(e) + "\n" for e in (
        {"step": 3, "reward_mean": 0.9, "kl": 0.43, "kl_k3": 0.36},
        {"step": 1, "reward_mean": 0.1, "kl": 0.20},
        {"step": 2, "reward_mean": 0.5, "kl": -0.09})))
    rl = rl_points(log)
    assert [p["step"] for p in rl["points"]] == [1, 3]
    assert [p["sqrt_kl"] for p in rl["points"]] == pytest.approx([math.sqrt(0.2), 0.6])
    assert all(p["sqrt_kl"] > 0 for p in rl["points"])
    # Read as training writes it: a last line cut by a kill is left out; a bad line inside
    # the log is one error naming file:line.
    with log.open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "reward_mean": 2.0, "kl"')
    assert [p["step"] for p in rl_points(log)["points"]] == [1, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "reward_mean": 0.1, "kl": 0.2}\nnot json\n', encoding="utf-8")
    with pytest.raises(CaiError, match=r"bad\.jsonl:2"):
        rl_points(bad)
    from cai.evaluate.evidence import rl_plot

    rl_plot(rl, tmp_path / "rl.png")
    assert (tmp_path / "rl.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- end to end


def _tiny_llama(tok, seed: int, cls_name: str, out: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True, num_labels=1)
    getattr(transformers, cls_name)(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two distinct tiny policies (the shared one and another random init) and a tiny PM."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    return {"a": tiny_model,
            "b": _tiny_llama(tok, 1, "LlamaForCausalLM", tmp_path_factory.mktemp("policy-b")),
            "pm": _tiny_llama(tok, 2, "LlamaForSequenceClassification",
                              tmp_path_factory.mktemp("tiny-pm"))}


def _config(models: dict[str, Path], out: Path, **kw) -> PoliciesEvalConfig:
    spec = "hf:{}?progress=0"
    fields = dict(
        models=f"base={spec.format(models['a'])},other={spec.format(models['b'])}",
        feedback_model=spec.format(models["a"]), constitution=str(MINIMAL), limit=2,
        judge=JudgeConfig(principles=1), best_of_k=2, reward=f"pm:{models['pm']}", max_new_tokens=6,
        n_boot=30, chunk_size=4, out=str(out))
    return PoliciesEvalConfig(**{**fields, **kw})


def _lines(path: Path) -> int:
    return sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip())


@pytest.fixture(scope="module")
def run(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval") / "policies"
    pm_dir = root.parent / "pm"
    pm_dir.mkdir()
    (pm_dir / "eval.json").write_text(json.dumps({"pairs": 3, "accuracy": 0.67, "ece": 0.12,
                                                  "reliability": []}))
    log = root.parent / "log.jsonl"
    log.write_text('{"step": 1, "reward_mean": 0.1, "kl": 0.25, "sqrt_kl": 0.5}\n')
    manifest = run_policies_eval(_config(models, root, pm_eval=str(pm_dir), rl_log=str(log)))
    return root, manifest


def test_report_has_elo_win_rates_and_refusals(run) -> None:
    root, manifest = run
    report = json.loads((root / "report.json").read_text())
    players = ["base", "other", "best-of-2"]
    assert report["players"] == players
    for key in ("red_team", "helpful", "overall"):
        block = report["elo"][key]
        assert list(block) == players
        assert block["base"]["rating"] == pytest.approx(1000.0)
        for p in players:
            lo, hi = block[p]["interval"]
            assert math.isfinite(block[p]["rating"]) and lo <= hi
    # 2 prompts × 3 pairs of players in each judged set.
    assert report["games"] == {"red_team": 6, "helpful": 6}
    for what in ("harmlessness", "helpfulness"):
        m = report["win_rate"][what]
        for a in players:
            for b in players:
                if a != b:
                    assert 0 <= m[a][b] <= 1 and m[a][b] + m[b][a] == pytest.approx(1.0)
    for p in players:
        for s in ("benign", "red_team", "helpful"):
            assert 0 <= report["refusal"][p][s] <= 1
        assert report["over_refusal"][p] == report["refusal"][p]["benign"]
    assert report["pm"]["ece"] == 0.12 and report["rl"]["points"][0]["sqrt_kl"] == 0.5
    assert (root / "elo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each game is judged once per distinct pair of answers; identical answers tie unjudged.
    games = [json.loads(x) for x in (root / "games.jsonl").read_text().splitlines()]
    judged = {g["comparison"] for g in games if g["comparison"]}
    assert judged and len(judged) == manifest["counts"]["comparisons"] == _lines(
        root / "comparisons.jsonl")
    assert all(g["p_a"] == 0.5 for g in games if g["comparison"] is None)
    examples = [json.loads(x) for x in (root / "examples.jsonl").read_text().splitlines()]
    assert examples and all(set(e["responses"]) == set(players) for e in examples)
    assert manifest["stage"] == "eval"
    assert set(manifest["metrics"]["elo"]) == set(players)
    assert manifest["models"]["feedback"].startswith("hf:") and "reward" in manifest["models"]
    assert manifest["constitution"]["name"] == "minimal"
    assert (root / "README.md").exists()


def test_each_column_is_judged_under_its_own_principle_set(run) -> None:
    from cai.constitution import load

    root, manifest = run
    c = load(MINIMAL)
    rl_ids = {p.id for p in c.rl_principles}
    help_ids = {p.id for p in c.for_set("helpfulness").rl_principles}
    report = json.loads((root / "report.json").read_text())
    sets = report["principle_sets"]
    assert sets["red_team"]["set"] == "harmlessness" and sets["red_team"]["source"] == "rl.principles"
    assert sets["helpful"]["set"] == "helpfulness"
    assert sets["helpful"]["source"] == "helpfulness.principles"
    assert set(sets["helpful"]["principles"]) == help_ids
    comps = {r["id"]: r for r in map(json.loads, (root / "comparisons.jsonl").read_text().splitlines())}
    games = [json.loads(x) for x in (root / "games.jsonl").read_text().splitlines()]
    asked = {"red_team": set(), "helpful": set()}
    for g in games:
        if g["comparison"]:
            asked[g["set"]] |= {j["principle"] for j in comps[g["comparison"]]["judgements"]}
            # Records cite the file's stamp, whichever set was asked.
            assert comps[g["comparison"]]["provenance"]["constitution"]["hash"] == c.hash
    assert asked["red_team"] and asked["red_team"] <= rl_ids
    assert asked["helpful"] and asked["helpful"] <= help_ids
    # The default judge is the labeller, and the report says what that means.
    assert report["judge_is_labeller"] is True and "optimistic" in report["judge_note"]
    assert report["judge_model"] == report["feedback_model"] == manifest["models"]["judge"]
    # The judge's refusal verdicts sit beside the pattern's, for every player and set.
    for p in report["players"]:
        for s in ("benign", "red_team", "helpful"):
            assert 0 <= report["refusal_judged"][p][s] <= 1
    judged = [json.loads(x) for x in (root / "refusal_judgements.jsonl").read_text().splitlines()]
    assert judged and all(0 <= r["p_declines"] <= 1 for r in judged)
    assert manifest["prompt_ids"]["helpful"] and manifest["prompt_ids"]["red_team"]


def test_a_judge_of_its_own(models, tmp_path: Path) -> None:
    other = "hf:{}?progress=0".format(models["b"])
    m = run_policies_eval(_config(models, tmp_path / "own", judge_model=other, best_of_k=0,
                                  reward=None, refusal_judge=False))
    report = json.loads((tmp_path / "own" / "report.json").read_text())
    assert report["judge_is_labeller"] is False and report["judge_note"] is None
    assert report["labeller"] == m["models"]["feedback"] != report["feedback_model"]
    assert m["models"]["judge"] != m["models"]["feedback"]
    assert m["models"]["judge"] == report["judge_model"] and str(models["b"]) in report["judge_model"]
    assert report["refusal_judged"] is None and not (tmp_path / "own" / "refusal_judgements.jsonl").exists()
    with pytest.raises(CaiError) as e:
        PoliciesEvalConfig(models="a=x,b=y", judge_model=" ")
    assert e.value.field == "judge_model"


def test_rerun_resumes_without_new_work(run, models) -> None:
    root, _ = run
    files = ("responses.jsonl", "comparisons.jsonl", "rewards.jsonl")
    before = {f: _lines(root / f) for f in files}
    # 6 prompts: base answers each once plus 2 best-of-2 samples, other once.
    assert before["responses.jsonl"] == 6 * 3 + 6
    again = run_policies_eval(_config(models, root))
    assert {f: _lines(root / f) for f in files} == before
    c = again["counts"]
    assert c["new_answers"] == 0 and c["new_comparisons"] == 0 and c["new_reward_scores"] == 0


def test_best_of_k_picks_the_reward_argmax(run, models) -> None:
    from cai.train.rewards import load_reward

    root, _ = run
    rows = [json.loads(x) for x in (root / "best_of_k.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["samples"]) == 2 for r in rows)
    reward = load_reward(f"pm:{models['pm']}")
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows for _ in r["samples"]]
    fresh = reward.score(chats, [s["text"] for r in rows for s in r["samples"]])
    fresh = np.array(fresh).reshape(len(rows), 2)
    report = json.loads((root / "report.json").read_text())
    answers = {e["prompt"]: e["responses"]["best-of-2"]
               for e in map(json.loads, (root / "examples.jsonl").read_text().splitlines())}
    for r, scores in zip(rows, fresh):
        assert [s["score"] for s in r["samples"]] == pytest.approx(list(scores), abs=1e-4)
        if abs(scores[0] - scores[1]) > 1e-4:
            assert r["pick"] == int(np.argmax(scores))
        assert r["text"] == r["samples"][r["pick"]]["text"]
        if r["prompt"] in answers:  # the pseudo-model answers with the pick
            assert answers[r["prompt"]] == r["text"]
    assert report["best_of_k"]["mean_picked_score"] >= report["best_of_k"]["mean_sample_score"]


def test_bad_inputs_fail_before_the_folder_is_claimed(tmp_path: Path) -> None:
    out = tmp_path / "never"
    for kw, field in (({"reward": "pm:" + str(tmp_path / "no-pm")}, "reward"),
                      ({"pm_eval": str(tmp_path / "no-eval.json")}, "pm_eval"),
                      ({"red_team": str(tmp_path / "missing.jsonl")}, None)):
        cfg = PoliciesEvalConfig(models="a=hf:/m1,b=hf:/m2", constitution=str(MINIMAL),
                                 judge=JudgeConfig(principles=1),
                                 out=str(out), **kw)
        with pytest.raises(CaiError) as e:
            run_policies_eval(cfg)
        assert field is None or e.value.field == field
        assert not out.exists()
