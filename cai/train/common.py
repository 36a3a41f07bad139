"""What every trainer (sft, pm, dpo, rl with PPO, RLOO or GRPO) shares: how a (prompt,
response) is shown to a model, and the training core of a run folder:

- `start_run`: claim the folder; a finished run with the same config is returned as it is,
  a run with another config is refused (`check_run_config`, `force` starts clean);
- checkpoints: `checkpoints/checkpoint-N`, written whole or not at all
  (`write_checkpoint`; `AtomicCheckpoints` for transformers Trainers), resumed from the
  newest complete one (`resume_point`);
- `log.jsonl`: one JSON line per step, appended as it happens and trimmed or rewritten on
  resume (`append_step`, `read_steps`, `rewrite_steps`).

The preference model, the reward used in RL and best-of-k must read a response exactly
the same way, or a reward model scores text it was never trained on; so the rendering
lives here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Chat = list[dict[str, str]]


def as_chat(prompt: Chat | str) -> Chat:
    """A prompt given as text or as a chat, as a chat."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def pm_text(tokenizer: Any, prompt: Chat | str, response: str) -> str:
    """The text a preference model scores: the conversation ending in the response.

    Uses the tokenizer's chat template when it has one, plain "Human:/Assistant:" text
    otherwise. The score is read at the last non-pad token of this text.
    """
    chat = as_chat(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False)
    from cai.backends.base import render_plain

    return render_plain(chat[:-1], response)


def control_strings(tokenizer: Any) -> list[str]:
    """Strings the tokenizer would turn into control tokens (`<|im_end|>`, ...)."""
    return sorted({t for t in [*tokenizer.added_tokens_encoder, *tokenizer.all_special_tokens] if t},
                  key=len)


def encode_chat(tokenizer: Any, chat: Chat, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat for training, with message text always plain tokens.

    Text from data may hold strings such as `<|im_end|>\n<|im_start|>assistant\n`; read
    through the template whole, they would become real control tokens and forge turns the
    model then learns from (or a reward model scores). A clean chat is encoded whole, exactly
    as before; one with such strings is encoded piece by piece: the template's own text with
    its control tokens, each message's text with those strings split into ordinary tokens
    (the same rule as the judge's `ChatFormat.encode_chat`). Without a chat template the
    chat is plain Human/Assistant text (the last message is the answer unless a
    generation prompt is asked for).
    """
    if not getattr(tokenizer, "chat_template", None):
        from cai.backends.base import render_plain

        text = (render_plain(chat) if add_generation_prompt
                else render_plain(chat[:-1], chat[-1]["content"]))
        return tokenizer(text, split_special_tokens=True)["input_ids"]

    def render(messages: Chat) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def encode(text: str, plain: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]

    control = control_strings(tokenizer)
    if not any(t in m["content"] for m in chat for t in control):
        return encode(render(chat))
    from cai.backends.chat import encode_segments

    return encode_segments(chat, render, encode, lambda t: encode(t, plain=True))


def prompt_completion_ids(tokenizer: Any, prompt: Chat, completions: list[str]
                          ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each completion's ids) as TRL's SFT and DPO trainers split them, but
    encoded by `encode_chat` so data text never becomes control tokens.

    The completion starts where the tokenized prompt and prompt + completion first differ
    (TRL's rule); without a chat template each completion ends with EOS, as TRL adds it.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    head = encode_chat(tokenizer, prompt, add_generation_prompt=True)
    fulls = []
    for c in completions:
        full = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": c}])
        if not chat and tokenizer.eos_token_id is not None:
            full = full + [tokenizer.eos_token_id]
        fulls.append(full)
    cut = len(head)
    for full in fulls:
        n = 0
        while n < min(cut, len(full)) and head[n] == full[n]:
            n += 1
        cut = n
    return head[:cut], [full[cut:] for full in fulls]


def check_policy_folder(path: Path, field: str = "model") -> None:
    """Refuse a preference (reward) model folder where a policy is trained: it loads as a
    causal LM only with a freshly initialised head, and the run would look fine."""
    from cai.core.errors import CaiError

    try:
        archs = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(
            "architectures") or []
    except (OSError, ValueError, AttributeError):
        return
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise CaiError("is a preference (reward) model with a score head, not a policy; give the "
                       "SFT model (or another causal LM) here", str(path), field)


# --------------------------------------------------------------------------- run folders

RUN_CONFIG = "run_config.json"
"""Where a training folder records the config (and its hash) it was started with."""
NOT_CONFIG = ("force",)
"""Fields that say how to run, not what is trained: never part of the recorded config."""
PYTHON_SOURCES = "python_sources"
"""In `run_config.json`: `spec -> sha256` of the file of each `python:` function the run
calls (a reward, a monitor), so a resume after the file was edited is refused."""


def _canonical(cfg: Any, ignore: tuple[str, ...]) -> dict[str, Any]:
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in data.items() if k not in (*NOT_CONFIG, *ignore)}


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _has_state(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ((ckpt.is_dir() and any(ckpt.glob("checkpoint-*"))) or (out / "checkpoint").is_dir()
            or any(out.glob("*.safetensors")))


def check_run_config(out: Path, cfg: Any, *, ignore: tuple[str, ...] = (), force: bool = False) -> None:
    """One resume rule for every trainer: a folder holding a run (checkpoints or a model)
    continues only under the config that started it.

    The config and its hash are recorded in `out/run_config.json`; a rerun with another
    config is refused naming the fields that differ, so an old checkpoint and schedule are
    never resumed under new settings while the manifest claims them. `force` starts clean:
    everything in the folder but its claim and lock is removed. Fields in `ignore` may change
    between resumes (how often to save, say).
    """
    from cai.core.errors import CaiError
    from cai.core.pyfunc import changed_sources, python_sources
    from cai.core.records import write_json_atomic

    mine = _canonical(cfg, ignore)
    sources = python_sources(cfg)
    stamp = out / RUN_CONFIG
    if force:
        for p in out.iterdir() if out.is_dir() else ():
            if p.name not in (".cai-lock", ".cai-stage"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif _has_state(out):
        legacy = out / "checkpoints" / "cai_config.json"  # where PM and DPO kept it before
        source = stamp if stamp.is_file() else legacy if legacy.is_file() else None
        if source is None:
            raise CaiError("holds a training run whose config was not recorded; rerun with "
                           "--force to start over, or use another --out", str(out))
        try:
            recorded = json.loads(source.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            raise CaiError("unreadable; rerun with --force to start over", str(source)) from None
        theirs = recorded.get("config", recorded) if source == stamp else recorded
        theirs = {k: v for k, v in theirs.items() if k not in (*NOT_CONFIG, *ignore)}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        edited = changed_sources(recorded.get(PYTHON_SOURCES) or {}, sources) \
            if source == stamp else []
        if edited and not diff:
            files = ", ".join(_source_name(spec) for spec in edited)
            raise CaiError(f"holds a run started with another version of {files} (the "
                           f"python: function{'s' if len(edited) > 1 else ''} "
                           f"{', '.join(edited)}); its steps would mix two functions: restore "
                           "the file, rerun with --force to start over, or use another --out",
                           str(out))
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:6])
            raise CaiError(f"holds a run with a different configuration ({shown}"
                           f"{', ...' if len(diff) > 6 else ''}); change it back, rerun with "
                           "--force to start over, or use another --out", str(out))
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"hash": config_hash(mine), "config": mine}
    if sources:  # the content of every python: file the run calls is part of its identity
        record["hash"] = config_hash({**mine, PYTHON_SOURCES: sources})
        record[PYTHON_SOURCES] = sources
    write_json_atomic(stamp, record)


def _source_name(spec: str) -> str:
    from cai.core.pyfunc import source_file

    try:
        return str(source_file(spec))
    except Exception:  # noqa: BLE001 - only a name for the message
        return spec


def start_run(out: Path, cfg: Any, stage: str, *, ignore: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """How every trainer enters its folder: claim it for `stage`; the manifest of a run of
    this stage finished with exactly this config (nothing to train: the caller returns it),
    else None once the folder is checked against the config that started it (`force` starts
    clean); training then continues from `resume_point(out)`."""
    from cai.core.stage import claim_dir, finished_run

    claim_dir(out, stage)
    done = finished_run(out, cfg, stage)
    if done is None:
        check_run_config(out, cfg, ignore=ignore, force=bool(getattr(cfg, "force", False)))
    return done


# --------------------------------------------------------------------------- checkpoints

CHECKPOINTS = "checkpoints"
"""Every trainer's checkpoints: `<out>/checkpoints/checkpoint-N` (N: the optimizer step)."""
STAGING = ".staging"
"""A checkpoint is written here first and renamed into place when complete."""
TRAINER_STATE = "trainer_state.json"
"""In each checkpoint: at least {"global_step": N}, the step it was taken after."""
STATE = "state.pt"
"""The one-file state (weights, optimizer, RNG) of a checkpoint of our own PPO trainer."""
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def disk_errors(path: Path, what: str = "checkpoint") -> Iterator[None]:
    """A full disk (or a file-size or quota limit) while saving is one `CaiError` naming
    the path, not a traceback from torch or safetensors; a rerun after freeing space
    resumes from the last complete checkpoint."""
    from cai.core.errors import CaiError

    try:
        yield
    except Exception as exc:
        text = str(exc)
        full = (isinstance(exc, OSError) and exc.errno in NO_SPACE) or any(
            s in text for s in ("No space left", "File too large", "file write failed",
                                "Disk quota", "FileTooLarge", "StorageFull", "QuotaExceeded"))
        if not full:
            raise
        raise CaiError(f"no space left to write the {what} (disk full or a size limit); free "
                       "space and rerun the same command to resume", str(path)) from None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from (None when it is complete): its
    trainer state must be there, and whole either our PPO's `state.pt` or a transformers
    Trainer's weights, optimizer and scheduler."""
    import zipfile

    step = folder.name.rpartition("-")[2]
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE}"
    if str(state.get("global_step")) != step:
        return f"{TRAINER_STATE} is at step {state.get('global_step')}"
    if (folder / STATE).exists():  # our own trainer's (PPO's) one-file state
        return None if zipfile.is_zipfile(folder / STATE) else f"{STATE} truncated"
    weights = [p for p in folder.glob("*.safetensors")]
    if not weights:
        return "no weights"
    try:
        from safetensors import safe_open

        for w in weights:
            with safe_open(str(w), "pt") as f:
                f.keys()
    except Exception:  # a truncated or damaged file: safetensors raises its own error type
        return "truncated weights"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(folder / name):
            return f"{name} missing or truncated"
    return None


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` in `folder`, or None.

    A torn one (a save cut by a kill or a full disk, or one an older version left) is
    skipped with a warning and the previous one used; a leftover staging folder is removed.
    """
    if not folder.is_dir():
        return None
    shutil.rmtree(folder / STAGING, ignore_errors=True)
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        warnings.warn(f"{path}: incomplete checkpoint ({problem}), left by an interrupted save; "
                      "resuming from the previous one", stacklevel=2)
    return None


def resume_point(out: Path) -> str | None:
    """The checkpoint a run in `out` continues from: the newest complete one, or None."""
    return last_checkpoint(out / CHECKPOINTS)


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None],
                     limit: int | None = 1) -> Path:
    """Write `checkpoint-<step>` in `run_dir` whole or not at all: `write(folder)` fills a
    folder under a staging name, renamed into place only when complete, so a kill or a full
    disk mid-save never leaves a checkpoint a rerun would fail to load; older ones beyond
    `limit` are removed only after the new one is in place."""
    name = f"checkpoint-{step}"
    staging, final = run_dir / STAGING, run_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with disk_errors(final):
            write(staging / name)
            if final.exists():  # a torn one from before, at the same step
                shutil.rmtree(final)
            os.replace(staging / name, final)
            _fsync_dir(run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _rotate(run_dir, final, limit)
    return final


class AtomicCheckpoints:
    """Mix into a transformers `Trainer`: its checkpoints go through `write_checkpoint`."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        parent = super()._save_checkpoint  # type: ignore[misc]

        def write(folder: Path) -> None:
            self._get_output_dir = lambda trial=None: str(folder.parent)  # the parent writes here
            try:
                parent(model, trial)
            finally:
                del self._get_output_dir

        write_checkpoint(run_dir, self.state.global_step, write,  # type: ignore[attr-defined]
                         self.args.save_total_limit)  # type: ignore[attr-defined]


@functools.cache
def atomic_trainer(cls: type) -> type:
    """`cls` (a transformers Trainer class) with `AtomicCheckpoints` mixed in."""
    return type(cls.__name__, (AtomicCheckpoints, cls), {"__doc__": cls.__doc__})


def _rotate(run_dir: Path, newest: Path, limit: int | None) -> None:
    """Keep `newest` and the `limit - 1` checkpoints just before it; later-numbered ones
    belong to a run abandoned at an earlier checkpoint (or are torn) and go too."""
    if not limit or limit < 1:
        return
    step = int(newest.name.rpartition("-")[2])
    others = sorted(((int(m.group(1)), p) for p in run_dir.iterdir()
                     if p != newest and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))),
                    reverse=True)
    keep = [p for n, p in others if n < step][:limit - 1]
    for _, p in others:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the step log

LOG = "log.jsonl"
"""Every trainer's per-step log in its folder."""


def append_step(path: Path, entry: dict[str, Any]) -> None:
    """Add one step's line to a log.jsonl as it happens (a live plot reads it; a kill loses
    at most the line being written)."""
    from cai.core.records import jsonl_text

    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_text([entry], ensure_ascii=True))


def rewrite_steps(path: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace a log.jsonl with these entries, atomically; returns them."""
    from cai.core.records import write_jsonl

    write_jsonl(path, entries, ensure_ascii=True)
    return entries


def read_steps(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The entries of a log.jsonl (none when there is no file), through the one jsonl reader;
    a last line cut by a kill (no newline yet) is left out. With `upto`, only the steps up to
    it: those after a checkpoint are about to be redone."""
    from cai.core.data import read_jsonl

    entries = read_jsonl(path, drop_torn=True, what="step log")
    return entries if upto is None else [e for e in entries if e.get("step", 0) <= upto]


def trainer_args(cls: type, cfg: Any, output_dir: Path | None, **extra: Any) -> Any:
    """TRL config from a trainer's config: its schedule, and the precision, gradient
    checkpointing and reporting of `cai.train.loading` (fp32 on a CPU under "auto").

    Without an output folder nothing is saved, and the Trainer gets a scratch folder (the
    caller removes it) instead of creating ./trainer_output in the working directory.
    """
    import torch

    from cai.train.loading import report_args, trainer_precision

    cuda = torch.cuda.is_available()
    if output_dir is not None:
        folder = str(output_dir)
        save = {"save_strategy": "steps", "save_steps": cfg.save_steps, "save_total_limit": 1}
    else:
        folder, save = tempfile.mkdtemp(prefix="cai-train-"), {"save_strategy": "no"}
    return cls(output_dir=folder,
               learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
               per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
               gradient_accumulation_steps=cfg.grad_accum, logging_steps=cfg.logging_steps,
               seed=cfg.seed, data_seed=cfg.seed, use_cpu=not cuda, **trainer_precision(cfg),
               gradient_checkpointing=cfg.gradient_checkpointing,
               gradient_checkpointing_kwargs={"use_reentrant": False},
               dataset_num_proc=None, disable_tqdm=False, **report_args(cfg), **save, **extra)


def log_callback(path: Path | None):
    """A TrainerCallback appending one JSON line per logging step (for live plots).

    When a run resumes, the file is first rewritten from the checkpoint's log history, so
    steps after the checkpoint are not listed twice.
    """
    from transformers import TrainerCallback

    class _JsonlLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if path is not None:
                write_log(path, state.log_history)

        def on_log(self, args, state, control, logs=None, **kw):
            if path is not None and logs and "loss" in logs:
                append_step(path, _log_entry(state.global_step, logs))

    return _JsonlLog()


def _log_entry(step: int, logs: dict[str, Any]) -> dict[str, Any]:
    entry = {"step": int(logs.get("step", step))}
    entry.update({k: v for k, v in logs.items() if isinstance(v, int | float) and k != "step"})
    return entry


def log_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-step entries of a Trainer log history, flattened to numbers."""
    return [_log_entry(e.get("step", 0), e) for e in history if "loss" in e]


def write_log(path: Path, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the training steps of a Trainer log history as log.jsonl; returns them."""
    return rewrite_steps(path, log_entries(history))


def finish_training(trainer: Any, lora: bool) -> Any:
    """The trained model as a plain transformers model (LoRA merged into the weights)."""
    model = trainer.model
    if lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return model


__all__ = ["pm_text", "as_chat", "encode_chat", "prompt_completion_ids", "control_strings",
           "check_run_config", "config_hash", "start_run", "last_checkpoint", "resume_point",
           "checkpoint_problem", "write_checkpoint", "AtomicCheckpoints", "atomic_trainer",
           "disk_errors", "RUN_CONFIG", "CHECKPOINTS", "STATE", "TRAINER_STATE", "LOG",
           "check_policy_folder",
           "trainer_args", "finish_training", "log_callback", "log_entries", "write_log",
           "append_step", "read_steps", "rewrite_steps"]
