"""Input loaders: prompt sets and response pairs, from jsonl files, local `datasets` folders,
parquet/csv/JSON files or the Hub (`hf:NAME?split=...`, read through `datasets.load_dataset`).

Every bad line is reported as file:line and field, so a user fixing a 10 000-line file
knows exactly where to look. A prompt is one user turn, or a conversation (`messages`, or an
hh-style "Human: ... Assistant: ..." transcript) whose last user turn is the one to answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, ValidationErrors, read_text

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("plain", "hh")
"""How a prompt field's text is read: as one user turn, or as an hh-style transcript."""


def dialogue(context: tuple[Message, ...] | list[Message], prompt: str) -> list[Message]:
    """The whole conversation: the earlier turns, then the user turn to answer."""
    return [{"role": m["role"], "content": m["content"]} for m in context] + [
        {"role": "user", "content": prompt}]


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a prompt set."""

    id: str
    prompt: str
    """The user turn to answer (the last one of a conversation)."""
    category: str = ""
    truncated: bool = False
    """The prompt text was cut to fit a model's context (a stage's `overlong: truncate`)."""
    context: tuple[Message, ...] = ()
    """The conversation's earlier turns (a system turn first, then user and assistant
    turns); empty for a one-turn prompt."""
    system: str = ""
    """A system prompt sent before it (an evaluation's test condition), in place of any
    system turn of the data; empty: none. Kept apart from the turns so the answer to the
    plain prompt and to the condition are told apart by their ids."""

    def conversation(self) -> list[Message]:
        """The chat a policy answers: every turn, ending with the user's."""
        turns = dialogue(self.context, self.prompt)
        if self.system:
            turns = [{"role": "system", "content": self.system},
                     *(m for m in turns if m["role"] != "system")]
        return turns

    def key(self) -> str | list[Message]:
        """What a record id hashes for this prompt: the text of a one-turn prompt (as ever),
        the whole conversation otherwise (a condition's system prompt is hashed apart)."""
        return dialogue(self.context, self.prompt) if self.context else self.prompt

    def tag(self) -> str:
        """The prompt as one string key: its text, or the conversation as JSON."""
        return (json.dumps(dialogue(self.context, self.prompt), ensure_ascii=False)
                if self.context else self.prompt)


@dataclass(frozen=True)
class PairItem:
    """A prompt with two responses to compare."""

    id: str
    prompt: str
    response_a: str
    response_b: str
    truncated: bool = False
    """Texts were cut to fit a model's context (a stage's `overlong: truncate`)."""
    context: tuple[Message, ...] = ()
    """Earlier turns of the conversation the responses answer (empty for one turn)."""

    def key(self) -> str | list[Message]:
        """The prompt as a record id hashes it: its text, or the whole conversation."""
        return dialogue(self.context, self.prompt) if self.context else self.prompt


def with_system(item: PromptItem, system_prompt: str | None) -> PromptItem:
    """The prompt with `system_prompt` as its system turn (replacing the data's own, so one
    stage option sets the policy's system prompt for every prompt); unchanged for None."""
    if not system_prompt:
        return item
    rest = tuple(m for m in item.context if m["role"] != "system")
    return dataclasses.replace(item, context=({"role": "system", "content": system_prompt},
                                              *rest))


def split_weight(spec: str) -> tuple[str, float | None]:
    """`PATH:WEIGHT` as (PATH, WEIGHT); (spec, None) when it has no numeric tail or names an
    existing path as a whole."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists():
        return spec, None
    try:
        return head, float(tail)
    except ValueError:
        return spec, None


def _text_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _rows(source: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a jsonl file, a `save_to_disk` folder, a parquet, csv or
    JSON-array file, or a Hub dataset (`hf:NAME?...`)."""
    if str(source).startswith(HF_PREFIX):
        return hub_rows(str(source))
    path = Path(source)
    if path.is_file() and _file_format(path):
        return hub_rows(str(path))
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (
            path / "dataset_dict.json").exists() and not (path / "state.json").exists():
        return hub_rows(str(path))  # a dataset folder of data files, read by load_dataset
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise CaiError(f"not a `datasets` folder: {exc}", str(path)) from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(ds)]
    if not path.exists():
        raise CaiError("file not found", str(path))
    return parse_jsonl(read_text(path, "jsonl file"), str(path))


HF_PREFIX = "hf:"
_HF_OPTIONS = ("config", "split", "data_dir", "field")


def _file_format(path: Path) -> str | None:
    """The `load_dataset` builder of a data file, or None for jsonl (read line by line here,
    so a bad line is named). A .json file is JSON lines unless it opens with `[`."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        return suffix[1:]
    if suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else None
    return None


def parse_hub_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`hf:NAME?config=...&split=...&data_dir=...&field=...` as (NAME, options)."""
    from urllib.parse import parse_qsl

    name, _, query = spec.removeprefix(HF_PREFIX).partition("?")
    if not name:
        raise CaiError("expected hf:NAME[?config=...&split=...&data_dir=...&field=...]", spec)
    opts = dict(parse_qsl(query, keep_blank_values=True))
    bad = sorted(set(opts) - set(_HF_OPTIONS))
    if bad:
        raise CaiError(f"unknown option {bad[0]!r}; use {', '.join(_HF_OPTIONS)}", spec)
    return name, opts


def hub_rows(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of a dataset read through `datasets.load_dataset`: a Hub name (from the
    local cache when offline), a local dataset folder, or a parquet/csv/JSON file.

    A dataset neither cached nor reachable is one line naming it. `field` renames a column
    to `prompt` (the column `--text-field` reads by default)."""
    import datasets

    name, opts = parse_hub_spec(spec) if spec.startswith(HF_PREFIX) else (spec, {})
    path = Path(name)
    split = opts.get("split") or "train"
    try:
        if path.is_file():
            fmt = _file_format(path)
            ds = datasets.load_dataset(fmt or "json", data_files=str(path), split=split)
        else:
            ds = datasets.load_dataset(name, opts.get("config") or None,
                                       data_dir=opts.get("data_dir") or None, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CaiError(f"cannot load dataset {name!r} (split {split!r}; not in the local Hugging "
                       f"Face cache and not reachable, or not a dataset): {first}",
                       spec) from None
    field = opts.get("field")
    if field and field not in ds.column_names:
        raise CaiError(f"no column {field!r}; the dataset has {', '.join(ds.column_names)}",
                       spec, "field")
    rows = []
    for i, row in enumerate(ds):
        row = dict(row)
        if field:
            row["prompt"] = row.pop(field)
        rows.append((f"{spec}[{i}]", row))
    return rows


def read_jsonl(path: str | Path, *, lenient: bool = False, drop_torn: bool = False,
               what: str = "jsonl file") -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file, in order; none when there is no file.

    Strict (the default): every bad line is an error naming `file:line` (`parse_jsonl`).
    `drop_torn`: a last line with no newline yet (a write cut by a kill) is left out.
    `lenient`, for readers of a run that may still be writing (report, results): lines that
    are not JSON objects, a torn last one among them, are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    if lenient:
        text = p.read_bytes().decode("utf-8", errors="replace")
    else:
        text = read_text(p, what)
    if drop_torn:
        text = text[:text.rfind("\n") + 1]
    return [obj for _, obj in parse_jsonl(text, str(p), skip_bad=lenient)]


def parse_jsonl(text: str, where: str, *, skip_bad: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(where:line, object) for each non-blank line of jsonl text; bad lines are reported
    together (up to 20), each as `file:line`, or with `skip_bad` left out. A UTF-8 byte-order
    mark is accepted, as in YAML."""
    rows, errors = [], []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(CaiError(f"invalid JSON: {exc.msg}", f"{where}:{n}"))
            continue
        except RecursionError:
            errors.append(CaiError("invalid JSON: nested too deeply", f"{where}:{n}"))
            continue
        if not isinstance(obj, dict):
            errors.append(CaiError("expected a JSON object", f"{where}:{n}"))
            continue
        rows.append((f"{where}:{n}", obj))
    if errors and not skip_bad:
        raise ValidationErrors(errors[:20])
    return rows


def _check_limit(limit: int | None) -> None:
    # `items[:0]` would be everything and `items[:-1]` all but the last: refuse both.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CaiError(f"must be at least 1, got {limit!r}", field="limit")


def _row_id(row: dict, fallback: str) -> str:
    value = row.get("id")
    return fallback if value is None or value == "" else str(value)


def _text(row: dict, key: str, where: str, errors: list[CaiError]) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if key not in row else "must be a non-empty string"
        errors.append(CaiError(what, where, key))
        return ""
    return value


def load_prompts(source: str | Path, text_field: str = "prompt",
                 limit: int | None = None, prompt_format: str = "plain") -> list[PromptItem]:
    """Prompts from jsonl (`prompt` or `messages`, optional `id`, `category`), a local
    dataset folder or file, or `hf:NAME`; a bare name (`red_team`) picks a shipped set."""
    from cai.core.resources import resolve

    _check_limit(limit)
    path = source if str(source).startswith(HF_PREFIX) else resolve(source, "prompts")
    return read_prompts(path, text_field, limit, source, prompt_format)


def parse_messages(value: Any, where: str, key: str = "messages") -> tuple[list[Message], str]:
    """(earlier turns, last user turn) of a list of {role, content} messages; a final
    assistant turn (the answer a stage is to write) is dropped."""
    if not isinstance(value, list) or not value:
        raise CaiError("expected a non-empty list of {role, content} messages", where, key)
    turns: list[Message] = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise CaiError(f"message {i + 1}: expected {{role: {'|'.join(ROLES)}, content: "
                           "text}", where, key)
        if m["role"] == "system" and i != 0:
            raise CaiError(f"message {i + 1}: a system turn may only come first", where, key)
        if not m["content"].strip() and not (m["role"] == "assistant" and i == len(value) - 1):
            raise CaiError(f"message {i + 1}: empty {m['role']} turn", where, key)
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise CaiError("the conversation must end with a user turn to answer", where, key)
    return turns[:-1], turns[-1]["content"]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh(text: str, where: str, key: str = "prompt") -> list[Message]:
    """The turns of an hh-rlhf style transcript: "\\n\\nHuman: ...\\n\\nAssistant: ..."."""
    body = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _HH_TURN.split(body)
    if parts[0].strip() or len(parts) < 3:
        raise CaiError('not an hh transcript: expected "\\n\\nHuman: ..." turns', where, key)
    turns, last = [], None
    for speaker, content in zip(parts[1::2], parts[2::2]):
        if speaker == last:
            raise CaiError(f"two {speaker} turns in a row", where, key)
        last = speaker
        turns.append({"role": "user" if speaker == "Human" else "assistant",
                      "content": content.strip()})
    if turns[0]["role"] != "user":
        raise CaiError("an hh transcript must open with a Human turn", where, key)
    return turns


def read_prompts(path: str | Path, text_field: str = "prompt", limit: int | None = None,
                 source: str | Path | None = None,
                 prompt_format: str = "plain") -> list[PromptItem]:
    """`load_prompts` for a path already resolved (a caller that resolves its inputs up
    front); `source` is the name the user gave, for the error of an empty set.

    A row with `messages` (or a list in the text field) is a conversation; with
    `prompt_format="hh"` the text field holds an hh transcript. A one-turn prompt's id
    hashes its text; a conversation's id hashes every turn."""
    _check_limit(limit)
    if prompt_format not in PROMPT_FORMATS:
        raise CaiError(f"must be one of {PROMPT_FORMATS}", field="prompt_format")
    items, errors, seen = [], [], set()
    for where, row in _rows(path):
        context: list[Message] = []
        try:
            value = row.get(text_field)
            if "messages" in row and text_field not in row:
                context, text = parse_messages(row["messages"], where)
            elif isinstance(value, list):
                context, text = parse_messages(value, where, text_field)
            elif prompt_format == "hh" and isinstance(value, str) and value.strip():
                context, text = parse_messages(parse_hh(value, where, text_field), where,
                                               text_field)
            else:
                text = _text(row, text_field, where, errors)
        except CaiError as err:
            errors.append(err)
            continue
        key = json.dumps(dialogue(context, text), ensure_ascii=False) if context else text
        pid = _row_id(row, _text_id(key))
        if pid in seen:
            errors.append(CaiError(f"duplicate id {pid!r}", where, "id"))
        seen.add(pid)
        items.append(PromptItem(pid, text, str(row.get("category") or ""),
                                context=tuple(context)))
    if errors:
        raise ValidationErrors(errors[:20])
    if not items:
        raise CaiError("no prompts", str(path if source is None else source))
    return items[:limit] if limit else items


def load_pairs(source: str | Path, limit: int | None = None) -> list[PairItem]:
    """Pairs from jsonl with `prompt` (text, or a list of messages: a conversation),
    `response_a`, `response_b` (optional `id`)."""
    _check_limit(limit)
    items, errors = [], []
    for where, row in _rows(source):
        context: list[Message] = []
        if isinstance(row.get("prompt"), list):  # a conversation: its last user turn answered
            try:
                context, last = parse_messages(row["prompt"], where, "prompt")
                row = {**row, "prompt": last}
            except CaiError as err:
                errors.append(err)
                continue
        p, a, b = (_text(row, k, where, errors) for k in ("prompt", "response_a", "response_b"))
        key = json.dumps(dialogue(context, p), ensure_ascii=False) if context else p
        items.append(PairItem(_row_id(row, _text_id(key, *sorted((a, b)))), p, a, b,
                              context=tuple(context)))
    if errors:
        raise ValidationErrors(errors[:20])
    if not items:
        raise CaiError("no pairs", str(source))
    return items[:limit] if limit else items
