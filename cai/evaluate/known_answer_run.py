"""`cai eval known-answer RUN`: score a finished known-answer run with its gold, exactly.

The known-answer pipeline (`configs/known-answer.yaml`) plants a gold preference in the
labels (`cai.evaluate.known_answer`); this stage measures what came out the other end, on
the run's held-out red-team prompts (`<run>/prompts/red_team.eval.jsonl`, never trained on):

- every policy (base, sl-cai, rl-cai, dpo, and where the run has them rl-direct and
  rl-direct-negated: PPO on the noisy gold itself and on its negation): `samples` answers
  per prompt, their gold mean with a 95 % bootstrap interval over prompts, and on the first
  `scored_samples` of them the train and test PMs' mean scores and the KL from the SL-CAI
  model (the mean of log π − log π_sl over the policy's own answers);
- each policy − sl: the paired difference of gold means, bootstrapped over prompts;
- the PM's accuracy against the gold: every pair of one prompt's held-out answers (all the
  policies' samples together) on which the gold differs, counted right when the PM scores
  the gold's choice higher, with a 95 % bootstrap interval over prompts (pairs cluster
  within prompts);
- best-of-n for n = 1, 2, 4, …, k from the SL answers (on the first `best_of_limit`
  prompts), picked by the train PM and scored by the train PM, the test PM and the gold
  against sqrt(KL_bon), KL_bon = log n − (n − 1)/n; its baseline is n = 1 on those prompts;
- RL's own per-step log (train PM = its reward, test PM and gold as monitors) against
  sqrt(KL), its baseline the gold monitor at the first step (sampled before any update from
  the SL-CAI policy, on the same training prompts and sampling as every later point);
- the fits of both overoptimization forms (`cai.evaluate.overopt`), each made only through
  five or more points and reported with its R² and points, a peak claimed only where the
  fit earns it.

It writes `known_answer.json`, `report.md` and `known_answer.png` into its folder and, with
`json`, a copy of the json (the benchmark record, `benchmarks/results/known_answer.json`).
Like every stage it locks its folder (one writer) and its manifest is the finished-marker,
written last; a run whose labels carry no planted gold, or that lacks a policy, the PM or
RL's whole log, is refused before anything is sampled, naming what is missing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.core.errors import CaiError
from cai.core.records import write_json_atomic
from cai.core.stage import Stage, register, write_manifest
from cai.evaluate.known_answer_stats import (
    best_of_n,
    bootstrap_mean,
    examples,
    fit_or_none,
    grid,
    matmul_gflops,
    pair_accuracy,
    pair_accuracy_ci,
    rl_baseline,
    rl_points,
)

STAGE = "eval-known-answer"
GOLD = "python:cai.evaluate.known_answer:valence_score"
"""The gold the known-answer run plants (configs/known-answer.yaml): graded, every answer scored."""
POLICIES = (("base", None), ("sl-cai", "sft"), ("rl-cai", "rl"), ("dpo", "dpo"),
            ("rl-direct", "rl-direct"), ("rl-direct-negated", "rl-direct-negated"))
"""Policies scored, with their folder in the run (base: the run's `model`); a missing
folder is skipped. rl-direct / rl-direct-negated: PPO on the noisy gold as a direct reward
and on its negation (the RL machinery's sign check, needing no PM)."""
DIFFS = {"rl-cai": "rl_minus_sl_gold", "dpo": "dpo_minus_sl_gold",
         "rl-direct": "rl_direct_minus_sl_gold",
         "rl-direct-negated": "rl_direct_negated_minus_sl_gold"}
"""The json key of each policy's paired gold difference from SL-CAI."""


@dataclass
class KnownAnswerConfig:
    """Configuration of `cai eval known-answer`."""

    run: str = "runs/known-answer"
    """The known-answer pipeline's run folder (sft, pm, rl, dpo, prompts/ inside)."""
    out: str | None = None
    """Folder for known_answer.json, report.md and the plot (default <run>/known-answer)."""
    json: str | None = None
    """Also copy known_answer.json here (the benchmark record)."""
    overwrite: bool = False
    """Replace an existing `json` file (never a file of the run)."""
    gold: str = GOLD
    """The gold reward spec: the planted property's exact score of an answer."""
    limit: int | None = None
    """Use only the first N held-out prompts (the issue asks for at least 64; the pipeline
    holds out 70)."""
    samples: int = 4
    """Answers per held-out prompt for each policy (the gold rates and the rl − sl, dpo − sl
    differences use this many; SL-CAI also gets `best_of`)."""
    scored_samples: int | None = None
    """How many of each prompt's `samples` answers the PMs score and the KL from SL-CAI reads
    (default all). The gold is a plain function of the text and scores every answer; the PM
    and log-prob passes cost as much as sampling, so on two cores the gold differences can
    get more answers than the PM figures."""
    engine: str = "hf"
    """What samples the answers: "hf" (transformers, one policy loaded at a time) or "vllm"
    (one engine, each policy's weights loaded into it in turn; seeded per answer either way,
    but the two engines draw different samples from the same seed)."""
    best_of: int = 16
    """k: SL-CAI answers per prompt for best-of-n, n = 1, 2, 4, …, k (a power of two; 16
    gives the five points a fit needs)."""
    best_of_limit: int | None = None
    """Best-of-n on only the first N held-out prompts (its k answers each are the costly
    part of the evaluation); default all."""
    max_new_tokens: int = 48
    """Tokens per answer (the RL stage's length, so RL is scored on what it trained on)."""
    batch_size: int = 16
    """Sequences per forward or generate call (on two cores larger batches do not pay
    for generation)."""
    n_boot: int = 1000
    """Bootstrap resamples of the prompts for each interval (percentile, 95 %)."""
    temperature: float = 1.0
    """Sampling temperature of the answers and of the KL's log-probs."""
    seed: int = 0
    """Seed of the sampling and the bootstrap."""
    base: bool = True
    """Also score the run's base model (the untrained policy's own gold mean, `base_rate`)."""
    started: float | None = None
    """Unix time the whole run started (`make known-answer` passes it) for `wall_s`;
    without it wall_s sums the stages' own timings and this one's."""

    def __post_init__(self) -> None:
        checks = [
            (self.samples >= 1, "samples", "must be at least 1"),
            (self.scored_samples is None or 1 <= self.scored_samples <= self.samples,
             "scored_samples", "must be between 1 and samples"),
            (self.engine in ("hf", "vllm"), "engine", 'must be "hf" or "vllm"'),
            (self.best_of >= 1 and self.best_of & (self.best_of - 1) == 0, "best_of",
             "must be a power of two (1, 2, 4, …)"),
            (self.limit is None or self.limit >= 1, "limit", "must be at least 1"),
            (self.best_of_limit is None or self.best_of_limit >= 1, "best_of_limit",
             "must be at least 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.n_boot >= 100, "n_boot", "must be at least 100"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)


# --------------------------------------------------------------------------- sampling


class _Policy:
    """A causal LM to sample answers from and read log-probs with."""

    def __init__(self, spec: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai.backends.chat import ChatFormat
        from cai.backends.hf import load_pretrained
        from cai.core.models import local_path

        path = str(local_path(spec))
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = load_pretrained(AutoModelForCausalLM, path, dtype=torch.float32).eval()
        self.fmt = ChatFormat(self.tok)
        pad = self.tok.pad_token_id
        self.pad = pad if pad is not None else self.fmt.stop_ids[0]

    def prompt_ids(self, text: str) -> list[int]:
        return self.fmt.encode(self.fmt.render([{"role": "user", "content": text}]))

    def sample(self, prompts: list[list[int]], seeds: list[int], cfg: KnownAnswerConfig
               ) -> list[list[int]]:
        from cai.train.rollout import HFRollout

        engine = HFRollout(self.model, self.pad, self.fmt.stop_ids)
        out: list[list[int]] = []
        for s in range(0, len(prompts), cfg.batch_size):
            out += engine.sample(prompts[s:s + cfg.batch_size], seeds[s:s + cfg.batch_size],
                                 cfg.max_new_tokens, cfg.temperature).tokens
        return out

    def text(self, tokens: list[int]) -> str:
        body = [t for t in tokens if t not in self.fmt.stop_ids]
        return self.tok.decode(body, skip_special_tokens=True).strip()

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]],
                 cfg: KnownAnswerConfig) -> list[float]:
        """Sum of log π(response token) at the sampling temperature, per answer."""
        import torch

        from cai.train.ppo import response_forward

        out = []
        for s in range(0, len(prompts), cfg.batch_size):
            ps, rs = prompts[s:s + cfg.batch_size], responses[s:s + cfg.batch_size]
            p_len, t_len = max(len(p) for p in ps), max(1, max(len(r) for r in rs))
            ids = [[self.pad] * (p_len - len(p)) + p + r + [self.pad] * (t_len - len(r))
                   for p, r in zip(ps, rs)]
            amask = [[0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (t_len - len(r))
                     for p, r in zip(ps, rs)]
            rmask = torch.tensor([[1.0] * len(r) + [0.0] * (t_len - len(r)) for r in rs])
            with torch.no_grad():
                lp = response_forward(self.model, torch.tensor(ids), torch.tensor(amask), t_len,
                                      cfg.temperature)["logp"]
            out += (lp * rmask).sum(1).tolist()
        return out


class _VLLMSampler:
    """One vLLM engine for every policy: it starts on SL-CAI's weights and loads each other
    policy's in turn (a weight reload, not a new engine)."""

    def __init__(self, spec: str, sl: _Policy, max_prompt: int, cfg: KnownAnswerConfig):
        from cai.core.models import local_path
        from cai.train.rollout import VLLMRollout

        self.engine = VLLMRollout(local_path(spec), sl.fmt.stop_ids, seed=cfg.seed,
                                  max_model_len=max_prompt + cfg.max_new_tokens)
        self.loaded = "sl-cai"

    def sample(self, name: str, pol: _Policy, prompts: list[list[int]], seeds: list[int],
               cfg: KnownAnswerConfig) -> list[list[int]]:
        if name != self.loaded:
            self.engine.sync(pol.model)
            self.loaded = name
        return self.engine.sample(prompts, seeds, cfg.max_new_tokens, cfg.temperature).tokens


def _seed(cfg: KnownAnswerConfig, policy: str, prompt: int, sample: int) -> int:
    from cai.core.seeds import derive_seed

    return derive_seed(cfg.seed, "known-answer", policy, prompt, sample) % 2**31


# --------------------------------------------------------------------------- the stage


def _pipeline(run: Path) -> dict[str, Any]:
    """The run's pipeline.json ({} when there is none); a corrupt one is one line."""
    path = run / "pipeline.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise CaiError("not valid JSON; is this a pipeline run?", str(path)) from None
    return data if isinstance(data, dict) else {}


def _policy_specs(run: Path, base_too: bool = True) -> dict[str, str]:
    base = (_pipeline(run).get("config") or {}).get("model") or "embedded:smollm2-135m"
    specs = {}
    for name, folder in POLICIES:
        if folder is None:
            if base_too:
                specs[name] = base
        elif (run / folder / "config.json").is_file():
            specs[name] = str(run / folder)
    if "sl-cai" not in specs:
        raise CaiError("no SL-CAI model (sft/) in the run; run the known-answer pipeline first",
                       str(run), "run")
    return specs


def planted_judge(run: Path) -> str | None:
    """The judge that labelled the run: the label stage's manifest, else the pipeline
    config (its `label: {feedback_model}` over the run's `feedback_model`)."""
    from cai.core.folders import read_manifest

    m = read_manifest(run / "label") if (run / "label" / "manifest.json").is_file() else None
    spec = m.config.get("feedback_model") if m else None
    if not spec:
        cfg = _pipeline(run).get("config") or {}
        spec = (cfg.get("label") or {}).get("feedback_model") or cfg.get("feedback_model")
    return spec if isinstance(spec, str) else None


def check_planted(run: Path, gold: str) -> str:
    """Refuse a run whose labels carry no planted gold: its judge must be a `python:`
    function of the gold's own module or file (`noisy_judge` or `gold_judge` beside
    `gold_score`), else the gold rates measure a preference nobody put in."""
    from cai.core.pyfunc import is_python_spec, source_file

    judge = planted_judge(run)
    if judge is None:
        raise CaiError("no label stage and no feedback_model in pipeline.json: nothing says a "
                       "gold was planted in this run's labels; score a run of "
                       "configs/known-answer.yaml", str(run), "run")
    if not is_python_spec(judge) or (
            source_file(judge, "feedback_model").resolve()
            != source_file(gold, "gold").resolve()):
        raise CaiError(f"this run was labelled by {judge!r}, not by a judge planted beside the "
                       f"gold {gold!r} (a python: function of the same module or file): its "
                       "gold rates would measure a preference nobody planted; score a run of "
                       "configs/known-answer.yaml", str(run), "run")
    return judge


def missing_parts(run: Path) -> list[str]:
    """What a known-answer evaluation needs and the run lacks: a model of every policy
    stage the pipeline ran (sft, rl, dpo), the train PM, and RL's whole step log."""
    from cai.core.data import parse_jsonl

    stages = (_pipeline(run).get("config") or {}).get("stages")
    expected = [s for s in ("sft", "pm", "rl", "dpo")
                if not isinstance(stages, list) or s in stages]
    out = [f"{s}/ (no finished model: no config.json)" for s in expected
           if not (run / s / "config.json").is_file()]
    log = run / "rl" / "log.jsonl"
    if "rl" in expected and (run / "rl" / "config.json").is_file():
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        if not text.strip():
            out.append("rl/log.jsonl (missing or empty: no RL steps to fit)")
        elif not text.endswith("\n"):
            out.append(f"rl/log.jsonl (line {text.count(chr(10)) + 1} is torn: cut by a kill)")
        else:
            try:
                parse_jsonl(text, str(log))
            except CaiError as err:
                out.append(f"rl/log.jsonl ({err})")
    return out


def stage_seconds(run: Path) -> dict[str, float]:
    """Each pipeline stage's own wall time (its manifest's `timings_s.total`), by folder:
    where the run's minutes went."""
    from cai.core.folders import read_manifest

    out: dict[str, float] = {}
    for m in sorted(run.glob("*/manifest.json")):
        manifest = read_manifest(m.parent)
        t = manifest.timings_s.get("total") if manifest else None
        if isinstance(t, int | float) and m.parent.name != "known-answer":
            out[m.parent.name] = round(float(t), 1)
    return out


def run_known_answer(cfg: KnownAnswerConfig) -> dict[str, Any]:
    """Sample, score and fit (see the module docstring); returns the manifest."""
    from cai.core.data import load_prompts
    from cai.core.folders import check_out_file, claim_dir
    from cai.train.rewards import PMReward, load_reward

    t0 = time.time()
    load_start = os.getloadavg()
    peak_start = matmul_gflops()
    run = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else run / "known-answer"
    held = run / "prompts" / "red_team.eval.jsonl"
    if not held.is_file():
        raise CaiError("no held-out prompts (prompts/red_team.eval.jsonl); run the known-answer "
                       "pipeline with eval_fraction > 0 first", str(run), "run")
    # Everything that can be checked is checked before the folder is touched.
    prompts = load_prompts(str(held), limit=cfg.limit)
    specs = _policy_specs(run, cfg.base)
    check_planted(run, cfg.gold)
    missing = missing_parts(run)
    if missing:
        raise CaiError(f"the run lacks what a known-answer evaluation reads: {'; '.join(missing)}"
                       "; finish the known-answer pipeline (rerun `cai pipeline run`) first",
                       str(run), "run")
    if cfg.json:
        check_out_file(cfg.json, inputs=[run, out], overwrite=cfg.overwrite, field="json")
    # One writer per folder; the manifest is the finished-marker, so it goes first and
    # comes back last (a kill in between leaves no output that looks finished).
    claim_dir(out, STAGE)
    for name in ("manifest.json", "known_answer.json"):
        (out / name).unlink(missing_ok=True)
    gold = load_reward(cfg.gold)
    pms: dict[str, Any] = {}
    for name, folder in (("train_pm", run / "pm"), ("test_pm", run / "pm" / "test")):
        if (folder / "config.json").is_file():
            pms[name] = PMReward(folder, cfg.batch_size)
    sl = _Policy(specs["sl-cai"])
    chats = [[{"role": "user", "content": p.prompt}] for p in prompts]
    ids = [sl.prompt_ids(p.prompt) for p in prompts]
    sampler = (_VLLMSampler(specs["sl-cai"], sl, max(map(len, ids)), cfg)
               if cfg.engine == "vllm" else None)
    n_scored = cfg.scored_samples or cfg.samples
    bon_rows = cfg.best_of_limit or len(prompts)
    per: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        pol = sl if name == "sl-cai" else _Policy(spec)
        n = max(cfg.samples, cfg.best_of) if name == "sl-cai" else cfg.samples
        # SL-CAI's extra best-of answers only on the prompts best-of-n uses; the rest of
        # its [prompts, n] arrays stay NaN and are read by nothing.
        n_of = [n if i < bon_rows else cfg.samples for i in range(len(prompts))]
        which = [(i, j) for i in range(len(prompts)) for j in range(n_of[i])]
        p_ids = [ids[i] for i, _ in which]
        seeds = [_seed(cfg, name, i, j) for i, j in which]
        toks = (sampler.sample(name, pol, p_ids, seeds, cfg) if sampler
                else pol.sample(p_ids, seeds, cfg))
        texts = [pol.text(t) for t in toks]
        pc = [chats[i] for i, _ in which]
        scores = {"gold": grid(which, gold.score(pc, texts), len(prompts), n)}
        # The PMs and the KL read the first `scored_samples` answers (and every best-of one).
        sc = [k for k, (i, j) in enumerate(which)
              if j < n_scored or (name == "sl-cai" and i < bon_rows)]
        s_which, s_ids, s_toks = [which[k] for k in sc], [p_ids[k] for k in sc], [toks[k] for k in sc]
        for pm_name, pm in pms.items():
            scores[pm_name] = grid(s_which, pm.score([pc[k] for k in sc], [texts[k] for k in sc]),
                                   len(prompts), n)
        kl = (np.zeros(len(sc)) if pol is sl else np.asarray(pol.logprobs(s_ids, s_toks, cfg))
              - np.asarray(sl.logprobs(s_ids, s_toks, cfg)))
        per[name] = {"spec": spec, "n": n, "scores": scores,
                     "kl": grid(s_which, kl, len(prompts), n),
                     "examples": examples(prompts, which, texts, scores["gold"])}
        if pol is not sl:
            del pol
    result = summarise(per, cfg)
    rlog = rl_points(run / "rl" / "log.jsonl")
    result["rl_steps"] = rlog
    pts = [(r["sqrt_kl"], r["gold"]) for r in rlog]
    base = rl_baseline(rlog)
    result["rl_fit"] = {form: fit_or_none(pts, form, base) for form in ("rl", "bon")}
    stages_s = stage_seconds(run)
    peak_end = matmul_gflops()
    result["wall_s"] = round((time.time() - cfg.started) if cfg.started
                             else sum(stages_s.values()) + time.time() - t0, 1)
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_at_start": load_start,
                         "matmul_gflops_at_start": peak_start,
                         "matmul_gflops_at_end": peak_end,
                         "load_avg_at_end": os.getloadavg(), "stages_s": stages_s,
                         "eval_s": round(time.time() - t0, 1)}
    result["provenance"] = {"run": str(run), "gold": getattr(gold, "spec", cfg.gold),
                            "policies": specs, "pms": {k: v.spec for k, v in pms.items()},
                            "sampling": {"temperature": cfg.temperature, "top_p": 1.0,
                                         "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
                            "pipeline": _pipeline_provenance(run)}
    from cai.evaluate.known_answer_report import write_report

    write_report(result, out)  # report.md and the plot, then the json, then the manifest
    write_json_atomic(out / "known_answer.json", result)
    manifest = write_manifest(out, STAGE, config=cfg, models=specs,
                              counts={"prompts": len(prompts)}, started=t0,
                              data=("known_answer.json",),
                              extra={"metrics": {k: result[k] for k in (
                                  "pm_gold_accuracy", "base_rate", "wall_s")}})
    if cfg.json:
        write_json_atomic(Path(cfg.json), result)
    return manifest



def summarise(per: dict[str, dict[str, Any]], cfg: KnownAnswerConfig) -> dict[str, Any]:
    """The json's numbers from each policy's [prompts, samples] score arrays."""
    policies: dict[str, Any] = {}
    for name, p in per.items():
        s = p["scores"]
        m = cfg.samples  # every policy is compared on its first `samples` answers
        sc = cfg.scored_samples or m  # and on its first `scored_samples` for the PMs and KL
        row = {"spec": p["spec"], "answers": int(s["gold"][:, :m].size),
               "gold": bootstrap_mean(s["gold"][:, :m].mean(1), cfg.n_boot, cfg.seed),
               "scored_answers": int(p["kl"][:, :sc].size),
               "kl_from_sl": float(p["kl"][:, :sc].mean()),
               "examples": p["examples"]}
        row["sqrt_kl_from_sl"] = math.sqrt(max(row["kl_from_sl"], 0.0))
        for k in ("train_pm", "test_pm"):
            if k in s:
                row[k] = float(s[k][:, :sc].mean())
        policies[name] = row
    sl = per["sl-cai"]["scores"]
    result: dict[str, Any] = {"policies": policies,
                              "base_rate": policies["base"]["gold"]["mean"]
                              if "base" in policies else None,
                              "prompts": int(sl["gold"].shape[0])}
    for name, key in DIFFS.items():
        if name in per:
            diff = per[name]["scores"]["gold"][:, :cfg.samples].mean(1) - \
                sl["gold"][:, :cfg.samples].mean(1)
            result[key] = bootstrap_mean(diff, cfg.n_boot, cfg.seed + 1)
    for k in ("train_pm", "test_pm"):
        if k in sl:
            # Every held-out answer to a prompt, whichever policy wrote it: more pairs,
            # and answers the PM never saw from policies it did and did not shape.
            groups = []
            for i in range(sl["gold"].shape[0]):
                pm_i = np.concatenate([p["scores"][k][i] for p in per.values()])
                gold_i = np.concatenate([p["scores"]["gold"][i] for p in per.values()])
                keep = ~np.isnan(pm_i)  # answers this prompt has that the PMs scored
                groups.append((pm_i[keep].tolist(), gold_i[keep].tolist()))
            acc = pair_accuracy_ci(groups, cfg.n_boot, cfg.seed + 2)
            key = "pm" if k == "train_pm" else "test_pm"
            result[f"{key}_gold_accuracy"] = acc["accuracy"]
            result[f"{key}_gold_accuracy_ci"] = {"ci_low": acc["ci_low"],
                                                 "ci_high": acc["ci_high"]}
            result[f"{key}_gold_pairs"] = acc["pairs"]
    result.setdefault("pm_gold_accuracy", None)
    if "train_pm" in sl and cfg.best_of >= 2:
        k, rows = cfg.best_of, slice(0, cfg.best_of_limit)
        bon = best_of_n(sl["train_pm"][rows, :k], {n: v[rows, :k] for n, v in sl.items()})
        result["best_of_n"] = bon
        result["best_of_n_prompts"] = int(sl["train_pm"][rows].shape[0])
        base = bon[0]["gold"]
        result["bon_fit"] = {"bon": fit_or_none([(r["sqrt_kl"], r["gold"]) for r in bon], "bon",
                                                base),
                             "rl": fit_or_none([(r["sqrt_kl"], r["gold"]) for r in bon], "rl",
                                               base)}
    return result


def _pipeline_provenance(run: Path) -> dict[str, Any]:
    """The run's config and constitution as pipeline.json keeps them."""
    pipe = _pipeline(run)
    return {k: pipe[k] for k in ("config", "constitution", "seed") if k in pipe}


register(Stage(name=STAGE, config=KnownAnswerConfig, run=run_known_answer,
               help="Score a known-answer run with its gold: gold rates, PM accuracy, "
                    "best-of-n and RL overoptimization curves.",
               inputs=(), outputs=("known_answer.json", "report.md", "known_answer.png"),
               positional=("run",), command="eval known-answer"))

__all__ = ["KnownAnswerConfig", "run_known_answer", "bootstrap_mean", "pair_accuracy",
           "pair_accuracy_ci", "best_of_n", "summarise", "rl_points", "rl_baseline", "examples",
           "fit_or_none", "grid", "matmul_gflops", "check_planted", "missing_parts"]
