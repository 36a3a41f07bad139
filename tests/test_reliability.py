"""Reliability of the run folder and the trainers: one writer per folder, no output over an
input, one resume rule, atomic checkpoints and turn integrity in training (issue #23)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import CaiError
from cai.records import JsonlStore, read_records
from cai.stage import LOCK, claim_dir

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"How do I do thing {i}?",
                                        "response_a": f"Like this {i}.", "response_b": "No."}) + "\n"
                            for i in range(n)))
    return path


def _label_args(tmp_path: Path, tiny_model: Path, out: Path, n: int = 24) -> list[str]:
    return ["label", "--pairs", str(_pairs(tmp_path / "pairs.jsonl", n)), "--constitution",
            str(MINIMAL), "--principles", "2", "--feedback-model", f"hf:{tiny_model}?progress=0",
            "--chunk-size", "1", "--out", str(out)]


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- 1. one writer


def test_lock_two_concurrent_writers_one_refused_no_duplicates(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "label"
    args = _label_args(tmp_path, tiny_model, out)
    procs = [subprocess.Popen([CAI, *args], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "another cai run" in lines[0] and str(out) in lines[0], err
    assert "Traceback" not in err
    for name in ("data.jsonl", "preferences.jsonl"):
        ids = _ids(out / name)
        assert len(ids) == len(set(ids)) == 24, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["records"] == 24
    # The lock went with the writer: a rerun now resumes (nothing new) and exits 0.
    r = subprocess.run([CAI, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(_ids(out / "data.jsonl")) == 24


def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    """A writer killed with SIGKILL leaves no stale lock: the next one takes the folder."""
    out = tmp_path / "folder"
    code = ("import sys, time; from pathlib import Path; from cai.stage import claim_dir; "
            "claim_dir(Path(sys.argv[1]), 'sl'); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        probe = ("import sys; from pathlib import Path; from cai.stage import claim_dir; "
                 "from cai.errors import CaiError\n"
                 "try:\n    claim_dir(Path(sys.argv[1]), 'sl')\n"
                 "except CaiError as e:\n    print(e); sys.exit(2)\n")
        busy = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True,
                              text=True, env=ENV, timeout=60)
        assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stdout, busy
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        free = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True,
                              text=True, env=ENV, timeout=60)
        assert free.returncode == 0, free
    finally:
        holder.kill()
        holder.wait()


def test_lock_same_process_reclaims_and_follows_a_recreated_folder(tmp_path: Path) -> None:
    out = tmp_path / "f"
    claim_dir(out, "sl")
    claim_dir(out, "sl")  # the pipeline and resumed stages claim again: not refused
    assert (out / LOCK).is_file()
    os.rename(out, tmp_path / "moved")  # what the pipeline does when it clears a stage
    claim_dir(out, "sl")  # the new folder gets its own lock
    assert (out / LOCK).read_text().strip() == str(os.getpid())


def test_lock_foreign_folder_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "sl"
    claim_dir(out, "sl")
    other = tmp_path / "other"
    other.mkdir()
    (other / ".cai-stage").write_text("label\n")
    with pytest.raises(CaiError, match="holds the output of stage `label`"):
        claim_dir(other, "sl")
    assert not (other / LOCK).exists()


def test_lock_loaders_refuse_duplicate_ids(tmp_path: Path) -> None:
    from cai.train.pm import load_preference_file

    store = tmp_path / "data.jsonl"
    store.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')
    with pytest.raises(CaiError, match=r"data.jsonl:3: id: duplicate id 'a'"):
        JsonlStore(store)
    with pytest.raises(CaiError, match=r"data.jsonl:3: id: duplicate id 'a'"):
        read_records(store)
    store.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert len(JsonlStore(store)) == 2 and len(read_records(store)) == 2
    prefs = tmp_path / "preferences.jsonl"
    row = {"id": "x", "prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.7}
    prefs.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "y"}) + "\n")
    assert len(load_preference_file(prefs, "labels", "preferences.jsonl")) == 2
    prefs.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(CaiError, match=r"preferences.jsonl:2: id: duplicate id 'x'"):
        load_preference_file(prefs, "labels", "preferences.jsonl")
    prefs.write_bytes(json.dumps(row).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(CaiError, match=r"preferences.jsonl:2: not UTF-8"):
        load_preference_file(prefs, "labels", "preferences.jsonl")


def test_lock_cli_second_writer_is_one_line(tmp_path: Path) -> None:
    """While this process holds a folder, a `cai` process writing there exits 2, one line."""
    out = tmp_path / "held"
    claim_dir(out, "train.sft")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
                   '"content": "y"}]}\n')
    r = subprocess.run([CAI, "train", "sft", "--data", str(sft), "--model", "/nonexistent/m",
                        "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "another cai run" in lines[0] and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- 2. out over input


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], needle: str) -> str:
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    return lines[0]


def test_out_over_input_model_folder_is_refused_untouched(tmp_path: Path, tiny_model: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.8}) + "\n")
    before = _tree(model)
    for cmd in (["train", "pm"], ["train", "dpo"]):
        for out, how in ((model, "--out is the input `model`"),
                         (model / "sub", "--out is inside the input `model`"),
                         (tmp_path, "--out contains the input")):
            _refused([*cmd, "--preferences", str(prefs), "--model", str(model), "--out", str(out)], how)
    assert _tree(model) == before  # not a byte changed, no lock or marker file added
    # A data input: sft --data FILE --out its folder.
    sft = tmp_path / "sl"
    sft.mkdir()
    (sft / "sft.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}, '
                                   '{"role": "assistant", "content": "y"}]}\n')
    _refused(["train", "sft", "--data", str(sft / "sft.jsonl"), "--model", str(model),
              "--out", str(sft)], "--out contains the input `data`")
    assert not (sft / ".cai-stage").exists() and not (sft / LOCK).exists()
    # Lists of model specs (eval policies) and prefixed specs count too.
    _refused(["eval", "policies", "--models", f"base=hf:{model},sft=embedded:smollm2-135m",
              "--out", str(model / "eval")], "--out is inside the input `models`")


def test_out_over_input_model_cache_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CAI_MODEL_CACHE", str(cache))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.8}) + "\n")
    line = _refused(["train", "pm", "--preferences", str(prefs), "--model", "embedded:smollm2-135m",
                     "--out", str(cache / "smollm2-135m")], "--out is the input `model`")
    assert "smollm2-135m" in line
    _refused(["train", "pm", "--preferences", str(prefs), "--model", "hf:/nonexistent",
              "--out", str(cache / "x")], "is inside the model cache")
    assert not cache.exists()  # refused before anything was converted or created


def test_out_over_input_unrelated_out_still_runs_checks(tmp_path: Path) -> None:
    """The guard does not refuse a plain, separate --out (the stage's own checks run)."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.8}) + "\n")
    _refused(["train", "pm", "--preferences", str(prefs), "--model", "/nonexistent/m",
              "--out", str(tmp_path / "pm")], "model folder not found")


def test_out_over_input_export(tmp_path: Path) -> None:
    data = tmp_path / "run" / "data.jsonl"
    data.parent.mkdir()
    data.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n')
    original = data.read_bytes()
    for fmt in ("parquet", "disk"):
        _refused(["export", str(data), "--out", str(data), "--format", fmt], "is the file being exported")
        _refused(["export", str(data), "--out", str(data.parent), "--format", fmt],
                 "contains the file being exported")
        _refused(["export", str(data), "--out", str(data), "--format", fmt, "--overwrite"],
                 "is the file being exported")
    assert data.read_bytes() == original
    other = tmp_path / "other.parquet"
    other.write_bytes(b"precious")
    _refused(["export", str(data), "--out", str(other), "--format", "parquet"], "pass --overwrite")
    assert other.read_bytes() == b"precious"
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    _refused(["export", str(data), "--out", str(folder)], "pass --overwrite")
    assert (folder / "keep.txt").read_text() == "mine"
    # With --overwrite both are replaced, through a temporary name that is gone afterwards.
    for out, fmt in ((other, "parquet"), (folder, "disk")):
        r = CliRunner().invoke(app, ["export", str(data), "--out", str(out), "--format", fmt,
                                     "--overwrite"])
        assert r.exit_code == 0, r.stderr
    import datasets

    assert datasets.Dataset.from_parquet(str(other))["id"] == ["a", "b"]
    assert datasets.load_from_disk(str(folder))["x"] == [1, 2] and not (folder / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "other.parquet", "run"]
    # A fresh --out needs no flag.
    r = CliRunner().invoke(app, ["export", str(data), "--out", str(tmp_path / "new.parquet"),
                                 "--format", "parquet"])
    assert r.exit_code == 0 and (tmp_path / "new.parquet").is_file()
