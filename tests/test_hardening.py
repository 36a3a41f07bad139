"""Hardening: every numeric option is checked where it is parsed; bad input to any command is
one `error:` line with exit code 2 and no partial output; over-long inputs are skipped or
truncated and counted, never run past the context; models and YAML load safely."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cai.backends import GenerationConfig, GenRequest, ScoreRequest
from cai.backends.base import Overlong, fit_texts
from cai.cli import app
from cai.constitution import load, parse, weighted_sample
from cai.core.config import coerce, from_dict, load_yaml_config
from cai.core.data import load_pairs, load_prompts
from cai.core.errors import CaiError
from cai.core.records import JsonlStore, read_records
from cai.judge import JudgeConfig, fit_pairs
from cai.label import LabelConfig, run_label
from cai.sl import SLConfig, run_sl

from .conftest import MINIMAL, ROOT

CAI = str(Path(sys.executable).parent / "cai")
NO_MODEL = "/nonexistent/model-folder"
LONG = "word " * 6000  # ~6k tokens: over the tiny model's 4096 positions


def _weights(text: str, value: str) -> str:
    """The minimal constitution with every weight (and one more per principle) set."""
    return re.sub(r"(\n\s+- id: [\w-]+\n)", rf"\1      weight: {value}\n",
                  text.replace("      weight: 2.0\n", ""))


@pytest.fixture
def f(tmp_path: Path) -> SimpleNamespace:
    """Good and bad input files, and output folders that do not exist yet."""
    d = tmp_path
    minimal = MINIMAL.read_text()
    files = {
        "prompts": '{"id": "q1", "prompt": "How do I pick a lock?"}\n',
        "pairs": '{"prompt": "p", "response_a": "a", "response_b": "b"}\n',
        "sft": '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        "items": '{"context": "c", "options": ["a", "b"], "correct": 0}\n',
        "empty.jsonl": "",
        "empty.yaml": "",
        "malformed.jsonl": '{"prompt": "fine"}\n{"prompt": "broken"\n',
        "malformed.yaml": "schema: cai.constitution/v1\nname: [unclosed\n",
        "list.yaml": "- rounds: 2\n",
        "pyobj.yaml": "!!python/object/apply:os.system [echo pwned]\n",
        "inf.yaml": _weights(minimal, ".inf"),
        "tiny.yaml": _weights(minimal, "1.0e-320"),
        "types.jsonl": '{"id": "1", "x": 1}\n{"id": "2", "x": "text"}\n',
        "pairs_ok": '{"id": "1", "prompt": "p", "response_a": "a", "response_b": "b"}\n',
        "afile": "not a folder\n",
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg"))
        + "model: *g\n",
        "dup_prefs": '{"id": "x", "prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.7}\n' * 2,
        "empty_prompt_prefs": '{"prompt": " ", "chosen": "c", "rejected": "r", "p_chosen": 0.7}\n',
        "pipe_wired.yaml": f"name: t\nout: {d / 'run'}\nstages: [sl, sft, label, pm]\n"
                           "pm:\n  out: elsewhere\n",
        "pipe_engine.yaml": f"name: t\nout: {d / 'run'}\nstages: [sl]\nsl:\n  engine: spark\n",
        "pipe_order.yaml": f"name: t\nout: {d / 'run'}\nstages: [sl, sft, eval]\n",
    }
    ns = SimpleNamespace(root=d, out=d / "out", const=str(MINIMAL))
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
        setattr(ns, name.replace(".", "_"), str(d / name))
    (d / "utf8.yaml").write_bytes(b"schema: cai.constitution/v1\nname: caf\xe9\n")
    (d / "utf8.jsonl").write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    ns.utf8_yaml, ns.utf8_jsonl = str(d / "utf8.yaml"), str(d / "utf8.jsonl")
    ns.below_file = str(d / "afile" / "out")
    if os.geteuid() == 0:  # root writes anywhere a permission allows; sysfs refuses even root
        ns.unwritable = "/sys/cai-hardening-test/out"
    else:
        ro = d / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        ns.unwritable = str(ro / "out")
    return ns


def _no_output(out: Path) -> None:
    """Nothing a stage writes exists: a failed command never leaves partial output."""
    for name in ("data.jsonl", "manifest.json", "README.md", "sft.jsonl", "preferences.jsonl",
                 "report.json"):
        assert not (out / name).exists(), name


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------- matrix

SL = ["sl", "--prompts", "{prompts}", "--constitution", "{const}", "--model", NO_MODEL,
      "--out", "{out}"]
LABEL = ["label", "--pairs", "{pairs}", "--constitution", "{const}", "--principles", "1",
         "--feedback-model", NO_MODEL, "--out", "{out}"]
SFT = ["train", "sft", "--data", "{sft}", "--model", NO_MODEL, "--out", "{out}"]
LABELER = ["eval", "labeler", "{items}", "--constitution", "{const}", "--principles", "1",
           "--feedback-model", NO_MODEL, "--out", "{out}"]
CONSTS = ["eval", "constitutions", "--old", "{const}", "--new", "{const}", "--pairs", "{pairs}",
          "--principles", "1", "--feedback-model", NO_MODEL, "--out", "{out}"]
EXPORT = ["export", "{pairs}", "--out", "{out}/export"]


def _with(base: list[str], **changes: str) -> list[str]:
    """`base` with flags changed (value None drops the flag) or added."""
    args = list(base)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            i = args.index(flag)
            args[i + 1:i + 2] = [value]
        else:
            args += [flag, value]
    return args


MATRIX = [
    # sl
    ("sl-constitution-not-utf8", _with(SL, constitution="{utf8_yaml}"), "utf8.yaml:2: not UTF-8"),
    ("sl-prompts-not-utf8", _with(SL, prompts="{utf8_jsonl}"), "utf8.jsonl:2: not UTF-8"),
    ("sl-config-not-utf8", ["sl", "--config", "{utf8_yaml}"], "utf8.yaml:2: not UTF-8"),
    ("sl-config-malformed", ["sl", "--config", "{malformed_yaml}"], "YAML syntax error"),
    ("sl-config-not-a-mapping", ["sl", "--config", "{list_yaml}"], "expected a mapping"),
    ("sl-config-python-object", ["sl", "--config", "{pyobj_yaml}"], "could not determine a constructor"),
    ("sl-config-missing", ["sl", "--config", "{root}/nope.yaml"], "cannot read config"),
    ("sl-chunk-size-0", _with(SL, chunk_size="0"), "chunk_size: must be at least 1"),
    ("sl-chunk-size-negative", _with(SL, chunk_size="-1"), "chunk_size: must be at least 1"),
    ("sl-limit-0", _with(SL, limit="0"), "limit: must be at least 1"),
    ("sl-limit-negative", _with(SL, limit="-1"), "limit: must be at least 1"),
    ("sl-rounds-0", _with(SL, rounds="0"), "rounds: must be from 1 to 64"),
    ("sl-temperature-nan", _with(SL, temperature="nan"), "temperature: expected a finite number"),
    ("sl-helpful-ratio-inf", _with(SL, helpful_ratio="inf"), "expected a finite number"),
    ("sl-top-p-above-1", _with(SL, top_p="1.5"), "top_p: must be in (0, 1]"),
    ("sl-few-shot-negative", _with(SL, few_shot="-1"), "few_shot: must be >= 0"),
    # refused, not clamped: minimal.yaml has one worked example (few_shot is in every record id)
    ("sl-few-shot-above-examples", _with(SL, few_shot="2"),
     "few_shot: 2 is more than the 1 worked examples of"),
    ("sl-overlong-unknown", _with(SL, overlong="wrap"), "overlong: must be one of"),
    ("sl-out-is-a-file", _with(SL, out="{afile}"), "exists and is not a folder"),
    ("sl-out-below-a-file", _with(SL, out="{below_file}"), "cannot write the output folder"),
    ("sl-out-not-writable", _with(SL, out="{unwritable}"), "cannot write the output folder"),
    ("sl-missing-model", SL, "model folder not found"),
    ("sl-missing-prompts", _with(SL, prompts="{root}/nope.jsonl"), "nope.jsonl: file not found"),
    ("sl-empty-prompts", _with(SL, prompts="{empty_jsonl}"), "no prompts"),
    ("sl-malformed-prompts", _with(SL, prompts="{malformed_jsonl}"), "malformed.jsonl:2: invalid JSON"),
    ("sl-empty-constitution", _with(SL, constitution="{empty_yaml}"), "expected a mapping at the top"),
    ("sl-missing-constitution", _with(SL, constitution="{root}/nope.yaml"), "cannot read constitution"),
    # label
    ("label-chunk-size-0", _with(LABEL, chunk_size="0"), "chunk_size: must be at least 1"),
    ("label-limit-0", _with(LABEL, limit="0"), "limit: must be at least 1"),
    ("label-principles-0", _with(LABEL, principles="0"), "principles: must be at least 1"),
    ("label-principles-too-many", _with(LABEL, principles="9"), "asks for 9 distinct principles"),
    ("label-tie-threshold-range", _with(LABEL, tie_threshold="0.5"), "tie_threshold: must be in [0, 0.5)"),
    ("label-low-mass-nan", _with(LABEL, low_mass_threshold="nan"), "expected a finite number"),
    ("label-temperature-negative", _with(LABEL, policy_temperature="-1"), "policy_temperature"),
    ("label-pairs-not-utf8", _with(LABEL, pairs="{utf8_jsonl}"), "utf8.jsonl:2: not UTF-8"),
    ("label-pairs-empty", _with(LABEL, pairs="{empty_jsonl}"), "no pairs"),
    ("label-missing-model", LABEL, "model folder not found"),
    ("label-out-is-a-file", _with(LABEL, out="{afile}"), "exists and is not a folder"),
    # train sft
    ("sft-data-not-utf8", _with(SFT, data="{utf8_jsonl}"), "not UTF-8"),
    ("sft-data-empty", _with(SFT, data="{empty_jsonl}"), "no SFT examples"),
    ("sft-learning-rate-nan", _with(SFT, learning_rate="nan"), "expected a finite number"),
    ("sft-batch-size-0", _with(SFT, batch_size="0"), "batch_size: must be at least 1"),
    ("sft-missing-model", SFT, "model folder not found"),
    ("sft-lora-dropout-above-1", _with(SFT, lora_dropout="1.5"), "lora_dropout: must be in [0, 1)"),
    ("sft-out-contains-data", _with(SFT, out="{root}"), "--out contains the input `data`"),
    ("sft-config-alias-bomb", ["train", "sft", "--config", "{bomb_yaml}"], "expands to more than"),
    # train rl: minibatch_size is PPO's; RLOO with a batch of 2 gets past the config to the reward
    ("rl-ppo-minibatch-above-batch", ["train", "rl", "--algo", "ppo", "--batch-size", "2",
                                      "--model", NO_MODEL, "--reward", "{root}/no-pm", "--out",
                                      "{out}"], "minibatch_size: must be between 1 and batch_size"),
    ("rl-rloo-batch-2-not-refused-for-minibatch", ["train", "rl", "--algo", "rloo", "--batch-size",
                                                   "2", "--num-generations", "2", "--model", NO_MODEL,
                                                   "--prompts", "{prompts}", "--reward",
                                                   "{root}/no-pm", "--out", "{out}"],
     "reward: reward folder not found"),
    # engines
    ("sl-engine-unknown", _with(SL, engine="spark"), "engine: use local or ray"),
    ("label-ray-address-dead", _with(LABEL, engine="ray", ray_address="127.0.0.1:9"), "does not answer"),
    # train pm / dpo: the data is read before any model loads
    ("pm-prefs-not-utf8", ["train", "pm", "--preferences", "{utf8_jsonl}", "--model", NO_MODEL,
                           "--out", "{out}"], "utf8.jsonl:2: not UTF-8"),
    ("pm-prefs-duplicate-id", ["train", "pm", "--preferences", "{dup_prefs}", "--model", NO_MODEL,
                               "--out", "{out}"], "dup_prefs:2: id: duplicate id 'x'"),
    ("dpo-prefs-empty-prompt", ["train", "dpo", "--preferences", "{empty_prompt_prefs}", "--model",
                                NO_MODEL, "--out", "{out}"], "empty_prompt_prefs:1: prompt: empty"),
    # pipeline
    ("pipeline-wired-override", ["pipeline", "run", "{pipe_wired_yaml}"],
     "pipe_wired.yaml:5: pm.out: is wired by the pipeline"),
    ("pipeline-sl-engine-spark", ["pipeline", "run", "{pipe_engine_yaml}"],
     "pipe_engine.yaml:5: sl.engine: use local or ray"),
    ("pipeline-from-after-until", ["pipeline", "run", "{pipe_order_yaml}", "--from", "eval",
                                   "--until", "sl"], "--from eval comes after --until sl"),
    # eval labeler / constitutions
    ("labeler-items-not-utf8", ["eval", "labeler", "{utf8_jsonl}", "--feedback-model", NO_MODEL,
                                "--out", "{out}"], "utf8.jsonl:2: not UTF-8"),
    ("labeler-bins-0", _with(LABELER, bins="0"), "bins: must be at least 1"),
    ("labeler-missing-model", LABELER, "model folder not found"),
    ("constitutions-old-not-utf8", _with(CONSTS, old="{utf8_yaml}"), "utf8.yaml:2: not UTF-8"),
    ("constitutions-limit-0", _with(CONSTS, limit="0"), "limit: must be at least 1"),
    ("constitutions-missing-model", CONSTS, "model folder not found"),
    # constitution show / diff (validate prints its own lines: below)
    ("show-infinite-weight", ["constitution", "show", "{inf_yaml}", "--json"], "weight: must be a number"),
    ("show-not-utf8", ["constitution", "show", "{utf8_yaml}"], "utf8.yaml:2: not UTF-8"),
    ("show-empty", ["constitution", "show", "{empty_yaml}"], "expected a mapping at the top"),
    ("diff-not-utf8", ["constitution", "diff", "{const}", "{utf8_yaml}"], "utf8.yaml:2: not UTF-8"),
    ("diff-missing", ["constitution", "diff", "{const}", "{root}/nope.yaml"], "cannot read constitution"),
    # export
    ("export-not-utf8", ["export", "{utf8_jsonl}", "--out", "{out}/export"], "utf8.jsonl:2: not UTF-8"),
    ("export-empty", ["export", "{empty_jsonl}", "--out", "{out}/export"], "no records"),
    ("export-malformed", ["export", "{malformed_jsonl}", "--out", "{out}/export"], "malformed.jsonl:2"),
    ("export-no-id", EXPORT, "pairs:1: id: missing"),
    ("export-types-change", ["export", "{types_jsonl}", "--out", "{out}/export"], "do not form one table"),
    ("export-out-is-a-file", ["export", "{pairs_ok}", "--out", "{afile}"], "exists and is not a folder"),
    ("export-parquet-out-is-a-file", ["export", "{pairs_ok}", "--out", "{afile}", "--format", "parquet"],
     "pass --overwrite"),
    ("export-own-input", ["export", "{pairs_ok}", "--out", "{pairs_ok}", "--format", "parquet"],
     "is the file being exported"),
    ("export-unknown-format", ["export", "{pairs_ok}", "--out", "{out}/x", "--format", "xml"],
     "unknown export format"),
    # models
    ("models-path-missing", ["models", "path", NO_MODEL], "model folder not found"),
    ("models-path-unknown-scheme", ["models", "path", "nope:thing"], "unknown model spec"),
    ("models-path-empty", ["models", "path", ""], "empty model spec"),
]


@pytest.mark.parametrize("name, args, needle", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_is_one_error_line(f: SimpleNamespace, name: str, args: list[str],
                                     needle: str) -> None:
    argv = [a.format(**vars(f)) for a in args]
    before = sorted(p.name for p in f.root.iterdir())
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    line = _one_error_line(r.stderr)
    assert needle in line, line
    _no_output(f.out)
    _no_output(f.out / "export")
    assert not (f.out / "export").exists() and not (f.out / "x").exists()
    if "out-is-a-file" in name:
        assert Path(f.afile).read_text() == "not a folder\n"
    if not name.startswith(("sl-out", "label-out")):
        # Only the output folder (claimed before any model loads) may have appeared.
        assert sorted(p.name for p in f.root.iterdir() if p.name != "out") == before


@pytest.mark.parametrize("file, needle", [
    ("inf_yaml", r":\d+: sl\.principles\[0\]\.weight: must be a number from 1e-06 to 1e\+06, got inf"),
    ("tiny_yaml", r":\d+: sl\.principles\[0\]\.weight: must be a number from 1e-06 to 1e\+06"),
    ("pyobj_yaml", r":1: YAML syntax error: could not determine a constructor"),
    ("utf8_yaml", r":2: not UTF-8 text"),
    ("malformed_yaml", r":2: YAML syntax error"),
])
def test_constitution_validate_names_file_and_line(f: SimpleNamespace, file: str, needle: str) -> None:
    path = getattr(f, file)
    r = CliRunner().invoke(app, ["constitution", "validate", path])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.exception is None or isinstance(r.exception, SystemExit)
    first = r.stderr.splitlines()[0]
    assert first.startswith(path) and re.search(needle, first), r.stderr


def test_unknown_option_is_a_usage_error(f: SimpleNamespace) -> None:
    for argv in (["sl", "--wobble", "3"], ["label", "--principle", "2"],
                 ["export", f.pairs, "--out", str(f.out), "--fromat", "x"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr
    _no_output(f.out)


def test_resume_with_a_bad_store_line_changes_nothing(f: SimpleNamespace) -> None:
    out = f.out
    out.mkdir()
    (out / ".cai-stage").write_text("sl\n")
    for content, needle in ((b'{"id": "a"}\n{"text": "no id"}\n{"id": "b"}\n', "data.jsonl:2: id"),
                            (b'{"id": "a"}\n{"id": "caf\xe9"}\n{"id": "b"}\n', "data.jsonl:2"),
                            (b'{"id": ["a"]}\n', "data.jsonl:1: id")):
        (out / "data.jsonl").write_bytes(content)
        r = CliRunner().invoke(app, [a.format(**vars(f)) for a in SL])
        assert r.exit_code == 2 and needle in _one_error_line(r.stderr)
        assert (out / "data.jsonl").read_bytes() == content  # nothing truncated or appended
        assert not (out / "manifest.json").exists()
    (out / "data.jsonl").unlink()
    (out / "data.jsonl").mkdir()  # the store is a folder: refused before any model loads
    r = CliRunner().invoke(app, [a.format(**vars(f)) for a in SL])
    assert r.exit_code == 2 and "data.jsonl: exists and is not a file" in _one_error_line(r.stderr)


def _cai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, *args], capture_output=True, text=True, timeout=120)


def test_real_process_errors_are_one_line(f: SimpleNamespace) -> None:
    """The same, as a user sees it: a separate process, its exit code and its stderr."""
    cases = [
        (_with(SL, constitution=f.utf8_yaml), "utf8.yaml:2: not UTF-8"),
        (_with(LABEL, chunk_size="0"), "chunk_size: must be at least 1"),
        (["constitution", "show", f.inf_yaml, "--json"], "weight: must be a number"),
        (_with(SL, out=f.below_file), "cannot write the output folder"),
    ]
    for args, needle in cases:
        r = _cai(*[a.format(**vars(f)) for a in args])
        assert r.returncode == 2, r.stderr
        assert needle in _one_error_line(r.stderr) and r.stdout == ""
        _no_output(f.out)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_label_into_an_sl_folder_leaves_it_byte_identical(f: SimpleNamespace) -> None:
    sl = f.root / "sl"
    sl.mkdir()
    (sl / "data.jsonl").write_text('{"id": "r1", "stage": "sl"}\n')
    (sl / "sft.jsonl").write_text("")
    (sl / "manifest.json").write_text(json.dumps({"stage": "sl", "data": {}}))
    (sl / "README.md").write_text("# SL-CAI data\n")
    before = _tree(sl)
    r = _cai(*[a.format(**vars(f)) for a in _with(LABEL, out=str(sl))])
    assert r.returncode == 2 and "holds the output of stage `sl`" in _one_error_line(r.stderr)
    assert "--out" in r.stderr  # says how to pick another folder
    assert _tree(sl) == before


def test_out_is_claimed_and_test_written_before_the_model_loads(f: SimpleNamespace) -> None:
    r = CliRunner().invoke(app, [a.format(**vars(f)) for a in SL])
    assert r.exit_code == 2 and "model folder not found" in r.stderr
    # The folder was created and written (its stage marker) before the model was looked up.
    assert (f.out / ".cai-stage").read_text() == "sl\n"
    _no_output(f.out)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("cls, kwargs, field", [
    (SLConfig, {"chunk_size": 0}, "chunk_size"),
    (SLConfig, {"limit": 0}, "limit"),
    (SLConfig, {"rounds": 65}, "rounds"),
    (SLConfig, {"samples_per_prompt": 0}, "samples_per_prompt"),
    (SLConfig, {"temperature": float("nan")}, "temperature"),
    (SLConfig, {"top_p": float("inf")}, "temperature"),
    (SLConfig, {"top_p": 0.0}, "top_p"),
    (SLConfig, {"min_words": -1}, "min_words"),
    (SLConfig, {"max_new_tokens": 0}, "max_new_tokens"),
    (SLConfig, {"overlong": "cut"}, "overlong"),
    (LabelConfig, {"pairs": "x", "chunk_size": -1}, "chunk_size"),
    (LabelConfig, {"pairs": "x", "limit": -1}, "limit"),
    (LabelConfig, {"pairs": "x", "max_new_tokens": 0}, "max_new_tokens"),
    (JudgeConfig, {"principles": 0}, "principles"),
    (LabelConfig, {"pairs": "x", "responses_per_prompt": 1}, "responses_per_prompt"),
    (LabelConfig, {"pairs": "x", "policy_temperature": float("inf")}, "policy_temperature"),
    (LabelConfig, {"pairs": "x", "overlong": "wrap"}, "overlong"),
    (JudgeConfig, {"tie_threshold": float("nan")}, "tie_threshold"),
    (JudgeConfig, {"low_mass_threshold": 1.5}, "low_mass_threshold"),
    (JudgeConfig, {"cot_max_new_tokens": 0}, "cot_max_new_tokens"),
])
def test_config_numbers_are_checked(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(CaiError) as exc:
        cls(**kwargs)
    assert exc.value.field == field


def test_coerce_refuses_non_finite_and_wrong_types(tmp_path: Path) -> None:
    for value in ("nan", "inf", "-inf", float("nan"), "1e999"):
        with pytest.raises(CaiError, match="finite"):
            coerce(SLConfig, "temperature", value)
    with pytest.raises(CaiError, match="expected str"):
        coerce(SLConfig, "prompts", ["a", "b"])  # a YAML list is not silently str()-ed
    with pytest.raises(CaiError, match="expected bool"):
        coerce(SLConfig, "drop_cut_off", "maybe")
    assert coerce(SLConfig, "temperature", "0.5") == 0.5
    cfg = tmp_path / "c.yaml"
    cfg.write_text("temperature: .nan\n")
    with pytest.raises(CaiError, match=rf"{re.escape(str(cfg))}: temperature: expected a finite"):
        load_yaml_config(SLConfig, cfg)
    cfg.write_text("chunk_size: 0\n")
    with pytest.raises(CaiError, match=rf"{re.escape(str(cfg))}: chunk_size: must be at least 1"):
        load_yaml_config(SLConfig, cfg)
    cfg.write_text("1: 2\n")
    with pytest.raises(CaiError, match="option names must be text"):
        load_yaml_config(SLConfig, cfg)
    with pytest.raises(CaiError, match="limit"):
        from_dict(SLConfig, {"limit": 0})


def test_limits_are_checked_by_the_loaders(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "response_a": "a", "response_b": "b"}) + "\n"
                         for i in range(3)))
    for bad in (0, -1, True):
        with pytest.raises(CaiError, match="limit: must be at least 1"):
            load_prompts(p, limit=bad)
        with pytest.raises(CaiError, match="limit: must be at least 1"):
            load_pairs(p, limit=bad)
    assert len(load_prompts(p, limit=2)) == 2 and len(load_pairs(p)) == 3


def test_constitution_weights_are_finite_and_in_range() -> None:
    text = MINIMAL.read_text()
    for value in (".inf", "-.inf", ".nan", "1.0e-320", "0", "-1.0", "1.0e+7"):
        with pytest.raises(CaiError, match=r"minimal.yaml:\d+: sl\.principles\[0\]\.weight"):
            parse(_weights(text, value), str(MINIMAL))
    c = parse(_weights(text, "1.0e+6"), "ok.yaml")
    json.dumps(c.to_json(), allow_nan=False)  # show --json is always valid JSON
    r = CliRunner().invoke(app, ["constitution", "show", str(MINIMAL), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["hash"] == load(MINIMAL).hash
    import random

    with pytest.raises(CaiError, match="weights"):
        weighted_sample(["a", "b"], [1.0, float("inf")], 1, random.Random(0))
    with pytest.raises(CaiError, match="at least 1"):
        weighted_sample(["a", "b"], [1.0, 1.0], 0, random.Random(0))


def test_yaml_aliases_cannot_blow_up_or_recurse() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg"))
    with pytest.raises(CaiError, match="more than"):
        parse(bomb, "bomb.yaml")
    with pytest.raises(CaiError, match="contains itself"):
        parse("a: &a {b: *a}\n", "loop.yaml")
    with pytest.raises(CaiError, match="nested too deeply"):
        parse("[" * 20000, "deep.yaml")


# ----------------------------------------------------------------------------- stores


def test_store_and_readers_refuse_bad_bytes_with_a_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a"}\n\xff\xfe\n{"id": "b"}\n')
    with pytest.raises(CaiError, match=r"data.jsonl:2"):
        JsonlStore(path)
    with pytest.raises(CaiError, match=r"data.jsonl:2: not UTF-8"):
        read_records(path)
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "prompt": "p", "response_a": "x", "response_b": "y"}\n')
    assert [r["id"] for r in read_records(path)] == ["a"]  # a BOM is fine, as in YAML
    assert load_pairs(path)[0].id == "a"
    path.write_text("[" * 100000 + "\n")
    with pytest.raises(CaiError, match="nested too deeply"):
        read_records(path)


def test_store_that_cannot_be_written_fails_before_work(tmp_path: Path) -> None:
    store = tmp_path / "s" / "data.jsonl"
    store.mkdir(parents=True)
    with pytest.raises(CaiError, match="exists and is not a file"):
        JsonlStore(store)
    fresh = tmp_path / "fresh" / "data.jsonl"
    JsonlStore(fresh)
    assert not fresh.exists()  # the write test leaves no empty file behind


# ----------------------------------------------------------------------------- over-long


def _long_prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"id": "short", "prompt": "How do I pick a lock?"}) + "\n"
                 + json.dumps({"id": "long", "prompt": "Summarise this: " + LONG}) + "\n")
    return p


def test_backend_reports_context_and_refuses_overlong_requests(tiny_backend) -> None:
    assert tiny_backend.context_length() == 4096  # the model config's max_position_embeddings
    chat = [{"role": "user", "content": "Hello there"}]
    assert tiny_backend.count_tokens(chat, "Sure") == len(tiny_backend.encode_chat(chat, "Sure"))
    long_chat = [{"role": "user", "content": LONG}]
    with pytest.raises(CaiError, match="exceeds the model's context of 4096 tokens"):
        tiny_backend.generate([GenRequest(long_chat)], GenerationConfig(max_new_tokens=4))
    with pytest.raises(CaiError, match="exceeds the model's context"):
        tiny_backend.choice_logprobs([ScoreRequest(long_chat, "The answer is: (")])
    n = tiny_backend.count_tokens(chat)
    with pytest.raises(CaiError, match="exceeds"):  # the prompt fits, prompt + budget does not
        tiny_backend.generate([GenRequest(chat)], GenerationConfig(max_new_tokens=4097 - n))


def test_openai_backend_context_only_with_a_local_tokenizer(tiny_model: Path) -> None:
    from cai.backends.openai import OpenAIBackend

    bare = OpenAIBackend("openai:http://127.0.0.1:9/v1#m")
    assert bare.context_length() is None and bare.count_tokens([{"role": "user", "content": "x"}]) is None
    local = OpenAIBackend(f"openai:http://127.0.0.1:9/v1#m?tokenizer={tiny_model}")
    assert local.context_length() == 4096
    assert local.count_tokens([{"role": "user", "content": "x"}]) > 1


def test_fit_texts_skips_or_cuts_to_the_largest_fitting_cap() -> None:
    def needed(texts: tuple[str, ...]) -> int:
        return sum(len(t) for t in texts) + 10

    skip = Overlong("skip")
    assert fit_texts(("abc", "de"), needed, 20, skip) == ("abc", "de")
    assert fit_texts(("a" * 30, "bb"), needed, 20, skip) is None and skip.skipped == 1
    cut = Overlong("truncate")
    assert fit_texts(("a" * 30, "bb", "c" * 9), needed, 20, cut) == ("a" * 4, "bb", "c" * 4)
    assert fit_texts(("a" * 30,), lambda t: 99, 20, cut) is None  # cannot fit: skipped
    assert (cut.truncated, cut.skipped) == (1, 1)
    assert cut.counts() == {"overlong_skipped": 1, "overlong_truncated": 1}
    assert Overlong().counts() == {}
    calls: list = []

    def counting(texts: tuple[str, ...]) -> int:
        calls.append(texts)
        return needed(texts)

    # With the empty-text cost known, clearly short texts are passed without counting.
    assert fit_texts(("abc",), counting, 100, Overlong(), base=10) == ("abc",) and not calls
    assert fit_texts(("a" * 40,), counting, 100, Overlong(), base=10) == ("a" * 40,) and calls


def test_sl_skips_or_truncates_overlong_prompts(tmp_path: Path, tiny_backend, capsys) -> None:
    base = dict(prompts=str(_long_prompts(tmp_path)), constitution=str(MINIMAL), rounds=1,
                max_new_tokens=4, seed=3)
    m = run_sl(SLConfig(**base, out=str(tmp_path / "skip")), tiny_backend)
    assert m["counts"]["overlong_skipped"] == 1 and m["counts"]["records"] == 1
    assert "skipped 1 prompts too long for the model's context of 4096" in capsys.readouterr().err
    recs = read_records(tmp_path / "skip" / "data.jsonl")
    assert [r["prompt_id"] for r in recs] == ["short"]
    m = run_sl(SLConfig(**base, out=str(tmp_path / "cut"), overlong="truncate"), tiny_backend)
    assert m["counts"]["overlong_truncated"] == 1 and m["counts"]["records"] == 2
    assert "truncated 1 prompts" in capsys.readouterr().err
    cut = {r["prompt_id"]: r for r in read_records(tmp_path / "cut" / "data.jsonl")}
    assert cut["long"]["prompt"] != "Summarise this: " + LONG
    assert ("Summarise this: " + LONG).startswith(cut["long"]["prompt"])
    assert "truncated-prompt" in cut["long"]["flags"] and cut["short"]["flags"] == []
    assert cut["short"]["id"] == recs[0]["id"]  # a prompt that fits is untouched
    # Rerun: the same prompts are cut the same way, so nothing is redone.
    again = run_sl(SLConfig(**base, out=str(tmp_path / "cut"), overlong="truncate"), tiny_backend)
    assert again["counts"]["new"] == 0 and again["counts"]["overlong_truncated"] == 1
    # A budget no prompt fits in is an error, not an empty run.
    with pytest.raises(CaiError, match="every prompt is too long"):
        run_sl(SLConfig(**{**base, "max_new_tokens": 2100}, out=str(tmp_path / "none")), tiny_backend)


def test_label_skips_or_truncates_overlong_pairs(tmp_path: Path, tiny_backend, capsys) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "ok", "prompt": "Q?", "response_a": "A.", "response_b": "B."})
                     + "\n" + json.dumps({"id": "big", "prompt": "Q2?", "response_a": LONG,
                                          "response_b": "No."}) + "\n")
    base = dict(pairs=str(pairs), constitution=str(MINIMAL), judge=JudgeConfig(principles=2))
    m = run_label(LabelConfig(**base, out=str(tmp_path / "skip")), tiny_backend)
    assert m["counts"] == {"records": 1, "new": 1, "overlong_skipped": 1}
    assert "skipped 1 pairs" in capsys.readouterr().err
    m = run_label(LabelConfig(**base, out=str(tmp_path / "cut"), overlong="truncate"), tiny_backend)
    assert m["counts"] == {"records": 2, "new": 2, "overlong_truncated": 1}
    big = next(r for r in read_records(tmp_path / "cut" / "data.jsonl") if r["pair_id"] == "big")
    assert "truncated-input" in big["flags"] and LONG.startswith(big["response_a"])
    assert big["response_b"] == "No." and big["prompt"] == "Q2?"  # short texts are not cut
    c = load(MINIMAL)
    for mode in ("score", "cot"):  # each mode's requests are measured as they will be sent
        judge = JudgeConfig(principles=1, mode=mode, cot_max_new_tokens=8)
        state = Overlong("truncate")
        kept = fit_pairs(load_pairs(pairs), c, tiny_backend, judge, 0, state)
        assert [p.truncated for p in kept] == [False, True] and state.truncated == 1


def test_label_policy_prompts_over_context_are_counted(tmp_path: Path, tiny_model: Path) -> None:
    spec = f"hf:{tiny_model}?progress=0"
    m = run_label(LabelConfig(prompts=str(_long_prompts(tmp_path)), policy=spec, feedback_model=spec,
                              constitution=str(MINIMAL), judge=JudgeConfig(principles=1),
                              max_new_tokens=4,
                              out=str(tmp_path / "lab")))
    assert m["counts"]["overlong_prompts_skipped"] == 1 and m["counts"]["records"] == 1
    responses = read_records(tmp_path / "lab" / "responses.jsonl")
    assert {r["prompt_id"] for r in responses} == {"short"}


# ----------------------------------------------------------------------------- safe loading


def test_pickled_weights_and_remote_code_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from cai.backends.hf import HFBackend

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(CaiError, match="no safetensors weights"):
        HFBackend(f"hf:{pickled}")

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                            "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    sentinel = tmp_path / "PWNED"
    (remote / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    with pytest.raises(CaiError, match="cannot load the model"):
        HFBackend(f"hf:{remote}")
    assert not sentinel.exists()


def _calls(pattern: str) -> list[tuple[str, int, str]]:
    """Every call matching `pattern` in the package source, with its full argument text."""
    hits = []
    for path in sorted((ROOT / "cai").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(pattern, text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            hits.append((str(path.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1,
                         text[m.start():end + 1]))
    return hits


def test_no_remote_code_and_no_unsafe_yaml_anywhere() -> None:
    for path in sorted((ROOT / "cai").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b",
                             text), path


def test_every_torch_load_is_weights_only() -> None:
    calls = _calls(r"\btorch\.load\(")
    bad = [f"{p}:{n}" for p, n, call in calls if not re.search(r"weights_only\s*=\s*True", call)]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_backends_load_safetensors_only() -> None:
    """Every model load in the package passes safetensors-only and no remote code; the one
    exception reads the embedded model's GGUF file (converted once, then saved as
    safetensors)."""
    loads = [c for c in _calls(r"(?<![`\w])(Auto\w*For\w+|\w*_cls)\.from_pretrained\(")
             if "gguf_file=" not in c[2]]
    assert any(p == "cai/backends/hf.py" for p, _, _ in loads)
    bad = [f"{p}:{n}" for p, n, call in loads
           if "use_safetensors=True" not in call or "trust_remote_code=False" not in call]
    assert not bad, f"a model load that may read pickled weights or run folder code at {bad}"
    vllm = (ROOT / "cai" / "backends" / "vllm.py").read_text()
    assert 'load_format="safetensors"' in vllm and "trust_remote_code=False" in vllm


def test_python_object_yaml_is_refused_everywhere(tmp_path: Path) -> None:
    evil = "!!python/object/apply:os.system ['touch " + str(tmp_path / "PWNED") + "']\n"
    with pytest.raises(CaiError, match="could not determine a constructor"):
        parse("schema: cai.constitution/v1\nname: " + evil, "c.yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rounds: " + evil)
    with pytest.raises(CaiError, match=rf"{re.escape(str(cfg))}:1: YAML syntax error"):
        load_yaml_config(SLConfig, cfg)
    assert not (tmp_path / "PWNED").exists()
