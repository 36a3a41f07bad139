"""`cai train pm`: the soft loss, soft targets learned as soft, ties, bad input, the stage
folder (manifest, upstream hash, constitution stamp, reload, skip, resume) and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.stage import write_manifest
from cai.train.plots import plot_run, reliability_png
from cai.train.pm import PMConfig, load_reward_model, pm_scores, run_pm, train_pm
from cai.train.prefs import (
    apply_ties,
    load_preference_file,
    load_training_rows,
    soft_preference_loss,
)

STAMP = {"name": "minimal", "version": "1.2.3", "hash": "sha256:" + "ab" * 32}
# A short system turn keeps the sequences (and the tests) short.
SYSTEM = {"role": "system", "content": "Be brief."}


def pref(i: str, prompt: str, chosen: str, rejected: str, p: float, **extra) -> dict:
    return {"id": i, "prompt": [SYSTEM, {"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "p_chosen": p, **extra}


def two_groups(n: int = 2) -> list[dict]:
    """Two easily told apart groups of pairs, labelled 0.9 and 0.6."""
    rows = []
    for k in range(n):
        rows.append(pref(f"a{k}", f"How do I bake bread {k}?", "Mix flour, water and yeast.", "No.", 0.9))
        rows.append(pref(f"b{k}", f"A moon fact {k}?", "It orbits the Earth.", "It is cheese.", 0.6))
    return rows


def as_rows(objs: list[dict], source: str = "labels") -> list[dict]:
    return [dict(o, weight=1.0, source=source) for o in objs]


def write_jsonl(path: Path, objs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the loss


def test_soft_loss_matches_hand_computation() -> None:
    import torch

    margins = [-2.0, -0.3, 0.0, 0.7, 3.0]
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    m = torch.tensor(margins)
    # Hard labels (p = 1) are the Bradley–Terry loss −log σ(Δ).
    hard = soft_preference_loss(m, torch.ones(5)).item()
    assert hard == pytest.approx(sum(-ls(x) for x in margins) / 5, rel=1e-6)
    # A soft label mixes both directions; weights scale each pair.
    p, w = [0.7, 0.2, 0.5, 0.9, 0.6], [1.0, 0.5, 2.0, 1.0, 0.0]
    soft = soft_preference_loss(m, torch.tensor(p), torch.tensor(w)).item()
    # The mean is over the 4 pairs of non-zero weight: the weight-0 pair is out of it.
    want = sum(-wi * (pi * ls(x) + (1 - pi) * ls(-x)) for x, pi, wi in zip(margins, p, w)) / 4
    assert soft == pytest.approx(want, rel=1e-6)
    # So adding weight-0 pairs changes neither the loss nor its gradient on the others.
    x = torch.tensor(margins[:4], requires_grad=True)
    soft_preference_loss(x, torch.tensor(p[:4]), torch.tensor(w[:4])).backward()
    padded = torch.tensor(margins[:4] + [0.1, -0.4], requires_grad=True)
    soft_preference_loss(padded, torch.tensor(p[:4] + [1.0, 1.0]),
                         torch.tensor(w[:4] + [0.0, 0.0])).backward()
    assert torch.allclose(x.grad, padded.grad[:4]) and padded.grad[4:].abs().sum() == 0
    # Its minimum is at σ(Δ) = p: zero gradient at logit(p), not at Δ → ∞.
    for target in (0.6, 0.9):
        x = torch.tensor([math.log(target / (1 - target))], requires_grad=True)
        soft_preference_loss(x, torch.tensor([target])).backward()
        assert abs(x.grad.item()) < 1e-6
        y = torch.tensor([5.0], requires_grad=True)
        soft_preference_loss(y, torch.tensor([target])).backward()
        assert y.grad.item() > 0.05  # a margin past the target is pushed back


def test_pm_learns_soft_targets_not_certainty(tiny_model: Path) -> None:
    rows = as_rows(two_groups())
    cfg = PMConfig(model=str(tiny_model), lora=False, learning_rate=3e-3, max_steps=80, batch_size=4,
                   eval_fraction=0, logging_steps=10, max_length=64)
    res = train_pm(rows, cfg)
    prompts = [r["prompt"] for r in rows]
    rc = pm_scores(res.model, res.tokenizer, prompts, [r["chosen"][0]["content"] for r in rows])
    rr = pm_scores(res.model, res.tokenizer, prompts, [r["rejected"][0]["content"] for r in rows])
    for r, c, j in zip(rows, rc, rr):
        q = 1 / (1 + math.exp(-(c - j)))
        assert abs(q - r["p_chosen"]) < 0.05, (r["id"], r["p_chosen"], q)
    assert res.steps == 80
    assert res.log and res.log[-1]["loss"] < res.log[0]["loss"]
    assert {"loss", "learning_rate", "epoch", "mean_p", "accuracy"} <= set(res.log[-1])


# --------------------------------------------------------------------------- data


def test_ties_drop_keep_and_weight() -> None:
    rows = as_rows([pref("close", "q", "a", "b", 0.52),
                    pref("flagged", "q", "a", "b", 0.8, flags=["tie"]),
                    pref("clear", "q", "a", "b", 0.8, flags=[]),
                    pref("half", "q", "a", "b", 0.5)])
    for r, flag in zip(rows, (False, True, False, False)):
        r["tie_flag"] = flag
    kept, c = apply_ties(rows, "keep", 0.05)
    assert [r["id"] for r in kept] == ["close", "flagged", "clear", "half"]
    assert [r["weight"] for r in kept] == [1.0] * 4 and c == {"ties": 3, "ties_dropped": 0}
    dropped, c = apply_ties(rows, "drop", 0.05)
    assert [r["id"] for r in dropped] == ["clear"] and c == {"ties": 3, "ties_dropped": 3}
    weighted, _ = apply_ties(rows, "weight", 0.05)
    # min(1, |p − ½| / 0.05): 0.52 → 0.4; the flag does not set a weight, p does.
    assert [round(r["weight"], 6) for r in weighted] == [0.4, 1.0, 1.0, 0.0]
    # Without the flag and with a zero threshold nothing is a tie.
    none, c = apply_ties([dict(r, tie_flag=False) for r in rows], "drop", 0.0)
    assert len(none) == 4 and c["ties"] == 0


def test_tie_weight_is_continuous_and_monotone() -> None:
    t = 0.05
    ps = [0.5 + k * 1e-4 for k in range(0, 1001)]  # 0.5 … 0.6, across the band's edge at 0.55
    rows = as_rows([pref(f"p{k}", "q", "a", "b", p) for k, p in enumerate(ps)])
    w = [r["weight"] for r in apply_ties(rows, "weight", t)[0]]
    assert w[0] == 0.0 and w[-1] == 1.0
    assert all(b >= a for a, b in zip(w, w[1:]))
    assert max(b - a for a, b in zip(w, w[1:])) < 0.01  # no jump anywhere, the edge included
    edge = ps.index(min(ps, key=lambda p: abs(p - 0.55)))
    assert w[edge - 1] == pytest.approx(w[edge + 1], abs=0.01) and w[edge + 1] == 1.0
    # The ramp is symmetric in the label's direction.
    low = as_rows([pref("lo", "q", "a", "b", 0.48)])
    assert apply_ties(low, "weight", t)[0][0]["weight"] == pytest.approx(0.4)


def test_accuracy_follows_the_label_direction() -> None:
    import torch

    from cai.train.prefs import direction_accuracy, preference_report

    rows = as_rows([pref("a", "q1", "x", "y", 0.3), pref("b", "q2", "x", "y", 0.9),
                    pref("c", "q3", "x", "y", 0.5), pref("d", "q4", "x", "y", 0.52)])
    # A PM that matches every label exactly: margin = logit(p).
    margins = [math.log(r["p_chosen"] / (1 - r["p_chosen"])) for r in rows]
    rep = preference_report(margins, rows, bins=5, tie_threshold=0.05)
    assert rep["accuracy"] == 1.0 and rep["accuracy_pairs"] == 2
    assert rep["accuracy_ties_excluded"] == 2
    assert rep["by_source"]["labels"]["accuracy"] == 1.0
    # Flipping every margin makes it wrong on both pairs that state a direction.
    assert preference_report([-m for m in margins], rows, bins=5, tie_threshold=0.05)["accuracy"] == 0.0
    # Without a tie band only the exact ½ is left out; 0.52 counts.
    assert preference_report(margins, rows, bins=5)["accuracy_pairs"] == 3
    p = torch.tensor([r["p_chosen"] for r in rows])
    assert direction_accuracy(torch.tensor(margins), p) == 1.0
    assert direction_accuracy(torch.tensor([1.0, 1.0, 1.0, 1.0]), p) == pytest.approx(2 / 3)
    assert direction_accuracy(torch.tensor([1.0]), torch.tensor([0.5])) is None


def test_heldout_pm_split_never_puts_one_prompt_on_both_sides() -> None:
    from cai.train.prefs import prompt_key, split_rows

    # 20 prompts with 3 labelled pairs each (3 responses per prompt) and one SL pair each,
    # the SL pair's chat holding no system turn: a split by pair would cut most prompts.
    rows = []
    for k in range(20):
        for j in range(3):
            rows.append(pref(f"l{k}-{j}", f"prompt number {k}", f"r{j}", f"r{(j + 1) % 3}", 0.7))
        rows.append({"id": f"s{k}", "prompt": [{"role": "user", "content": f"prompt number {k}"}],
                     "chosen": [{"role": "assistant", "content": "rev"}],
                     "rejected": [{"role": "assistant", "content": "init"}], "p_chosen": 1.0})
    rows = as_rows(rows)
    for seed in range(6):
        for fraction in (0.1, 0.25, 0.5):
            order = rows[seed:] + rows[:seed]  # row order must not matter either
            train, held = split_rows(order, fraction, seed)
            tk = {prompt_key(r["prompt"]) for r in train}
            hk = {prompt_key(r["prompt"]) for r in held}
            assert tk and hk and not tk & hk, (seed, fraction)
            assert len(hk) == round(20 * fraction) and len(train) + len(held) == len(rows)
            assert {r["id"] for r in held} == {r["id"] for r in split_rows(rows, fraction, seed)[1]}
    # A row-level split of the same data (the old behaviour) does cut prompts in two.
    import random

    idx = list(range(len(rows)))
    random.Random(0).shuffle(idx)
    held_rows = [rows[i] for i in idx[:20]]
    rest = [rows[i] for i in idx[20:]]
    assert {prompt_key(r["prompt"]) for r in held_rows} & {prompt_key(r["prompt"]) for r in rest}
    # Different seeds hold out different prompts.
    assert split_rows(rows, 0.25, 0)[1] != split_rows(rows, 0.25, 1)[1]


def test_preferences_and_pairs_load_with_sources_and_ties(tmp_path: Path) -> None:
    prefs = write_jsonl(tmp_path / "label" / "preferences.jsonl",
                        [pref("x", "q", "a", "b", 0.8), pref("t", "q", "a", "b", 0.49)])
    write_jsonl(tmp_path / "sl" / "pairs.jsonl", [pref("s", "q", "a", "b", 1.0)])
    rows, counts = load_training_rows(PMConfig(preferences=str(prefs.parent), pairs=str(tmp_path / "sl"),
                                               ties="drop", pairs_weight=0.5))
    assert [(r["id"], r["source"], r["weight"]) for r in rows] == [("x", "labels", 1.0),
                                                                   ("s", "sl-pairs", 0.5)]
    assert counts == {"preferences": 2, "sl_pairs": 1, "ties": 1, "ties_dropped": 1}


@pytest.mark.parametrize(("line", "field", "msg"), [
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 1.5}', "p_chosen", "probability"),
    ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b", "p_chosen": 0.7}',
     "chosen", "assistant"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b", "p_chosen": 0.7}', "prompt", "messages"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"}', "p_chosen", "probability"),
])
def test_bad_line_names_file_line_and_field(tmp_path: Path, line: str, field: str, msg: str) -> None:
    p = tmp_path / "preferences.jsonl"
    p.write_text(json.dumps(pref("ok", "q", "a", "b", 0.7)) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(CaiError, match=rf"preferences\.jsonl:3: {field}: .*{msg}") as exc:
        load_preference_file(p, "labels", "preferences.jsonl")
    assert exc.value.where == f"{p}:3" and exc.value.field == field


def test_broken_json_and_missing_inputs(tmp_path: Path) -> None:
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(CaiError, match=r"pairs\.jsonl:2: invalid JSON"):
        load_preference_file(p, "sl-pairs", "pairs.jsonl", default_p=1.0)
    # SL pairs may leave p_chosen out: it is 1.
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    assert load_preference_file(ok, "sl-pairs", "pairs.jsonl", 1.0)[0]["p_chosen"] == 1.0
    with pytest.raises(CaiError, match="preferences"):
        load_training_rows(PMConfig())
    with pytest.raises(CaiError) as exc:
        PMConfig(ties="maybe")
    assert exc.value.field == "ties"
    with pytest.raises(CaiError) as exc:
        PMConfig(eval_fraction=1.0)
    assert exc.value.field == "eval_fraction"


# --------------------------------------------------------------------------- the stage


def fake_label_stage(root: Path, objs: list[dict]) -> Path:
    """An upstream label folder: preferences.jsonl and a manifest with a constitution stamp."""
    write_jsonl(root / "preferences.jsonl", objs)
    write_manifest(root, "label", config={"pairs": "x.jsonl"}, constitution=STAMP,
                   data=("preferences.jsonl",))
    return root


def test_run_pm_writes_a_traceable_loadable_folder(tiny_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cai.train.pm as pm

    up = fake_label_stage(tmp_path / "label", two_groups(4))
    sl = write_jsonl(tmp_path / "sl" / "pairs.jsonl", [pref("s0", "Say hi", "Hi!", "Go away.", 1.0)])
    cfg = PMConfig(preferences=str(up), pairs=str(sl), model=str(tiny_model), out=str(tmp_path / "pm"),
                   lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=6, batch_size=2,
                   eval_fraction=0.34, save_steps=4, max_length=64)
    m = run_pm(cfg)
    out = Path(cfg.out)
    for name in ("model.safetensors", "config.json", "eval.json", "log.jsonl", "calibration.png",
                 "README.md", "manifest.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert m["stage"] == "pm" and m["constitution"] == STAMP
    label_manifest = json.loads((up / "manifest.json").read_text())
    assert m["upstream"]["preferences"]["data_sha256"] == label_manifest["data"]["sha256"]
    assert m["upstream"]["pairs"]["sha256"].startswith("sha256:")
    assert m["data"]["file"] == "model.safetensors" and m["data"]["sha256"]
    assert m["counts"]["preferences"] == 8 and m["counts"]["sl_pairs"] == 1
    assert m["counts"]["train"] + m["counts"]["eval"] == 9 and m["counts"]["eval"] == 3
    assert m["counts"]["steps"] == 6 and "eval_accuracy" in m["metrics"]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 3 and 0 <= report["ece"] <= 1
    assert sum(s["pairs"] for s in report["by_source"].values()) == 3
    # The folder is a reward model: it reloads and scores, as RL will use it.
    model, tok = load_reward_model(out)
    assert model.config.pad_token_id == tok.pad_token_id == 0 != tok.eos_token_id
    s = pm_scores(model, tok, ["Say hi", "Say hi"], ["Hi!", "Go away."], batch_size=2)
    assert len(s) == 2 and all(math.isfinite(x) for x in s) and s[0] != s[1]
    # The same config again is already done: no training, the same manifest.
    monkeypatch.setattr(pm, "train_pm", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run_pm(cfg) == m


def test_run_pm_resumes_after_a_crash(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt  # like a kill, after the step-2 checkpoint

    up = fake_label_stage(tmp_path / "label", two_groups(2))
    cfg = PMConfig(preferences=str(up), model=str(tiny_model), out=str(tmp_path / "pm"), lora=False,
                   learning_rate=1e-3, max_steps=5, batch_size=2, eval_fraction=0, save_steps=2,
                   max_length=64)
    with pytest.raises(KeyboardInterrupt):
        run_pm(cfg, callbacks=[Crash()])
    assert (Path(cfg.out) / "checkpoints" / "checkpoint-2").is_dir()
    assert not (Path(cfg.out) / "manifest.json").exists()
    # A different config must not silently continue these checkpoints.
    with pytest.raises(CaiError, match="different configuration"):
        run_pm(PMConfig(**{**cfg.__dict__, "learning_rate": 2e-3}))
    m = run_pm(cfg)
    assert m["counts"]["resumed"] is True and m["counts"]["steps"] == 5
    steps = [json.loads(x)["step"] for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_another_stage_folder_is_refused(tmp_path: Path) -> None:
    up = fake_label_stage(tmp_path / "label", two_groups(1))
    with pytest.raises(CaiError, match="stage `label`"):
        run_pm(PMConfig(preferences=str(up), out=str(up)))


# --------------------------------------------------------------------------- plots


def test_plot_run_and_reliability_png(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_jsonl(run / "log.jsonl", [{"step": s, "loss": 1 / s, "learning_rate": 1e-3 * (5 - s) / 5,
                                     "epoch": s / 5, "rewards/margins": 0.1 * s} for s in range(1, 6)])
    files = plot_run(run)
    assert sorted(f.name for f in files) == ["learning_rate.png", "loss.png", "rewards_margins.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaiError, match="log.jsonl"):
        plot_run(tmp_path / "empty")
    png = reliability_png([{"lo": 0.5, "hi": 0.75, "n": 3, "confidence": 0.6, "accuracy": 0.55},
                           {"lo": 0.75, "hi": 1.0, "n": 1, "confidence": 0.9, "accuracy": 0.8}],
                          tmp_path / "c" / "calibration.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
