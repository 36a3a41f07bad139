"""The `cai` command: a thin layer over the public API.

Stage commands take their flags from the stage's config dataclass (names, types, defaults
and help all come from it), optionally on top of a YAML file given with `--config`.
Every user error prints one line naming file:line and field and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from cai.core.config import (
    _base_type,
    field_docs,
    flat_fields,
    from_dict,
    load_yaml_config,
    nest,
)
from cai.core.errors import CaiError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the summary JSON

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Constitutional AI and RLAIF: from a versioned constitution to a harmless model.")
models_app = typer.Typer(no_args_is_help=True, help="Known model specs and their local folders.")
const_app = typer.Typer(no_args_is_help=True, help="Validate, show and diff constitutions.")
train_app = typer.Typer(no_args_is_help=True, help="Train on the stages' outputs.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate labelers, constitutions and models.")
app.add_typer(models_app, name="models")
app.add_typer(const_app, name="constitution")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
pipeline_app = typer.Typer(no_args_is_help=True, help="Run every stage from one config.")
app.add_typer(pipeline_app, name="pipeline")


def fail(err: Exception) -> typing.NoReturn:
    """One `error:` line (exit code 2); further errors of the same file follow it, indented."""
    first, *rest = str(err).splitlines() or [type(err).__name__]
    typer.echo("\n".join([f"error: {first}", *(f"  {line}" for line in rest)]), err=True)
    raise typer.Exit(2)


def user_errors(fn: Callable) -> Callable:
    """Turn user errors into one message and exit code 2 (no traceback).

    Besides `CaiError`, what the environment does to a run — a file that is not UTF-8, a
    path that is a folder, a disk that is full or read-only — is one line too; set
    CAI_DEBUG=1 to get the traceback of those instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CaiError as err:
            fail(err)
        except (UnicodeDecodeError, OSError) as err:
            if os.environ.get("CAI_DEBUG"):
                raise
            if isinstance(err, UnicodeDecodeError):
                fail(CaiError(f"not UTF-8 text (byte {err.start}: {err.reason}); save the file "
                              "as UTF-8"))
            if isinstance(err, FileNotFoundError):
                fail(CaiError(f"file not found: {err.filename}"))
            where = err.filename if isinstance(err.filename, str) else None
            fail(CaiError(err.strerror or str(err) or type(err).__name__, where))

    return wrapper


def config_command(group: typer.Typer, name: str, cls: type, help: str,
                   run: Callable[[Any], Any], positional: tuple[str, ...] = ()) -> None:
    """Register a command whose options are the fields of config dataclass `cls`.

    Every option defaults to "not given", so a value from `--config FILE` is only
    overridden by flags the user actually typed. Fields named in `positional` are also
    accepted as optional positional arguments (`cai eval labeler FILE`).
    """
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=typer.Option(
        None, "--config", help="YAML file with these options (flags override it)."),
        annotation=Optional[Path])]  # noqa: UP045 - typer needs a real Optional here
    for pos in positional:
        params.append(inspect.Parameter(
            f"{pos}_arg", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],  # noqa: UP045
            default=typer.Argument(None, metavar=pos.upper(), show_default=False,
                                   help=f"Same as --{pos.replace('_', '-')}.")))
    paths: dict[str, str] = {}  # parameter name -> field path ("judge.principles")
    many: dict[str, str] = {}  # a repeatable flag -> the field path its repeats fill
    for path, f, owner in flat_fields(cls):
        if f.metadata.get("cli") is False:  # set by another field's repeated flag
            continue
        if f.name in paths:
            raise RuntimeError(f"{cls.__name__}: two fields would share the flag of {f.name!r}")
        paths[f.name] = path
        tp = _base_type(typing.get_type_hints(owner)[f.name])
        tp = tp if tp in (int, float, str, bool) else str
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        docs = field_docs(owner)
        decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
        if f.metadata.get("many"):
            many[f.name] = f.metadata["many"]
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, *decls, help=escape(f"{docs.get(f.name, '')} [default: {default}]"),
                                 show_default=False,
                                 metavar=f"<{tp.__name__}>" if f.name in many else None),
            annotation=Optional[list[tp]] if f.name in many else Optional[tp]))  # noqa: UP045

    @user_errors
    def command(**kwargs: Any) -> None:
        path = kwargs.pop("config")
        for pos in positional:
            value = kwargs.pop(f"{pos}_arg")
            if value is not None:
                kwargs[pos] = value
        for k, target in many.items():  # one value: the field; repeated: the list field
            values = kwargs.pop(k)
            if values:
                kwargs[k if len(values) == 1 else target] = (values[0] if len(values) == 1
                                                              else list(values))
                paths.setdefault(target, target)
        given = nest({paths.get(k, k): v for k, v in kwargs.items() if v is not None})
        cfg = (load_yaml_config(cls, path, overrides=given) if path else from_dict(cls, given))
        result = run(cfg)
        if result is not None:
            typer.echo(json.dumps(_summary(result), indent=2, default=str))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name
    command.__doc__ = help
    group.command(name, help=help)(command)


def _summary(manifest: dict) -> dict:
    keys = ("stage", "counts", "label_stats", "metrics", "timings_s", "output")
    return {k: manifest[k] for k in keys if k in manifest}


# --------------------------------------------------------------------------- models


@models_app.command("list")
@user_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Known model specs and whether each is converted and cached."""
    from cai.core.models import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['spec']:<26} {'cached' if r['cached'] else 'not cached':<11} {r['path']}")
    typer.echo("Other specs: hf:PATH | vllm:PATH | openai:http://HOST:PORT/v1#MODEL")


@models_app.command("path")
@user_errors
def models_path(spec: str) -> None:
    """Print the local folder of a model (converting the embedded model on first use)."""
    from cai.core.models import local_path

    typer.echo(str(local_path(spec)))


# --------------------------------------------------------------------------- constitution


@const_app.command("validate")
def constitution_validate(files: list[Path]) -> None:
    """Validate constitution files; errors name file:line and field, exit code 2."""
    from cai.constitution import load

    bad = False
    for f in files:
        try:
            c = load(f)
        except CaiError as err:
            typer.echo(str(err), err=True)
            bad = True
            continue
        helpful = (f"{len(c.for_set('helpfulness').rl_principles)} helpfulness principles"
                   if c.has_helpfulness else "no helpfulness principles: helpful prompts are "
                   "judged with the rl ones")
        typer.echo(f"{f}: ok ({c.name} v{c.version}, {len(c.sl_principles)} sl principles, "
                   f"{len(c.rl_principles)} rl principles, {helpful}, {len(c.few_shot)} examples, "
                   f"{c.hash})")
    if bad:
        raise typer.Exit(2)


@const_app.command("show")
@user_errors
def constitution_show(file: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a constitution (with its content hash)."""
    from cai.constitution import load

    c = load(file)
    if as_json:
        typer.echo(json.dumps(c.to_json(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"{c.name} v{c.version}  {c.hash}\n{c.spec.description}\n")
    typer.echo(f"SL principles ({c.spec.sl.rounds} rounds by default):")
    for p in c.sl_principles:
        typer.echo(f"  {p.id} (w={p.weight:g}): {p.critique}")
    typer.echo("RL principles:")
    for q in c.rl_principles:
        typer.echo(f"  {q.id} (w={q.weight:g}): {q.text}")
    if c.has_helpfulness:
        typer.echo("Helpfulness principles (the evaluation's helpful prompts):")
        for q in c.for_set("helpfulness").rl_principles:
            typer.echo(f"  {q.id} (w={q.weight:g}): {q.text}")


@const_app.command("diff")
@user_errors
def constitution_diff(old: Path, new: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Principles added, removed and changed by id; warns when the version was not bumped."""
    from cai.constitution import diff, load

    d = diff(load(old), load(new))
    if as_json:
        typer.echo(json.dumps(d.as_dict(), indent=2))
    else:
        typer.echo(f"{old} ({d.old.version}) -> {new} ({d.new.version})")
        for section in ("sl", "rl", "helpfulness"):
            for kind, ids in (("+", d.added[section]), ("-", d.removed[section]),
                              ("~", d.changed[section])):
                for i in ids:
                    typer.echo(f"  {kind} {section}.{i}")
        for o in d.other_changes:
            typer.echo(f"  ~ {o}")
        if not d.content_changed:
            typer.echo("  (no content change)")
    if d.version_warning:
        typer.echo(f"warning: {d.version_warning}", err=True)


# --------------------------------------------------------------------------- stages


def _register_stages() -> None:
    """One command per registered stage: "sl" → `cai sl`, "pm" → `cai train pm`."""
    from cai.core.stage import load_registry

    groups = {"train": train_app, "eval": eval_app}
    for stage in load_registry().values():
        leaf = (stage.command or stage.name).split()[-1]
        config_command(groups[stage.group] if stage.group else app, leaf, stage.config, stage.help,
                       stage.run, positional=stage.positional)


_register_stages()


@pipeline_app.command("run")
@user_errors
def pipeline_run(
    config: Path = typer.Argument(..., help="Pipeline YAML (see configs/demo.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<name>)."),  # noqa: UP045
    start: Optional[str] = typer.Option(None, "--from", help="Start at this stage."),  # noqa: UP045
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),  # noqa: UP045
    force: bool = typer.Option(False, "--force", help="Rerun stages even when cached."),
) -> None:
    """sl → sft → label → pm → rl/dpo → eval, each cached by its config and inputs."""
    from cai.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(config, {"out": str(out)} if out else None)
    state = run_pipeline(cfg, start, until, force, where=str(config))
    typer.echo(json.dumps({"run": str(cfg.root), "report": state.get("report"),
                           "seconds": state.get("seconds"),
                           "steps": {k: v.get("status") for k, v in state["steps"].items()}},
                          indent=2))


@app.command("plot")
@user_errors
def plot_cmd(run_dir: Path) -> None:
    """PNG plots of a training run's per-step log (reward, KL, sqrt(KL), loss, ...)."""
    from cai.train.plots import plot_run

    for p in plot_run(run_dir):
        typer.echo(str(p))


@app.command("report")
@user_errors
def report_cmd(run_dir: Path,
               html: bool = typer.Option(False, "--html", help="Also write one self-contained "
                                         "HTML file (figures inline, opens offline)."),
               out: Optional[Path] = typer.Option(None, "--out", help="The HTML file (default "  # noqa: UP045
                                                  "RUN/report.html); needs --html."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing "
                                              "--out file (never a file of the run).")) -> None:
    """Write RUN/report.md (and with --html the report as one HTML file) from a run folder."""
    from cai.report import write_report, write_report_html

    if out is not None and not html:
        raise CaiError("--out names the HTML file; add --html", field="out")
    if overwrite and out is None:
        raise CaiError("--overwrite goes with --out (the default report.html is always "
                       "refreshed)", field="overwrite")
    if not run_dir.is_dir():
        raise CaiError("not a run folder", str(run_dir))
    typer.echo(str(write_report_html(run_dir, out, overwrite=overwrite) if html
                   else write_report(run_dir)))


@app.command("view")
@user_errors
def view_cmd(runs: list[Path] = typer.Argument(..., help="A run folder, or OLD NEW to compare."),
             host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (local only "
                                      "by default)."),
             port: int = typer.Option(8765, "--port", help="Port to listen on."),
             allow_host: Optional[list[str]] = typer.Option(  # noqa: UP045
                 None, "--allow-host", help="Another name browsers may reach the viewer by (a "
                 "DNS name of this machine); besides loopback, --host and this machine's own "
                 "names, every other Host header gets 400.")) -> None:
    """A local, read-only web viewer of a run's records, labels, training and evaluation."""
    import errno
    import socket

    if len(runs) > 2:
        raise CaiError("give one run folder, or two (OLD NEW) to compare")
    if not 0 < port < 65536:
        raise CaiError("must be from 1 to 65535", field="port")
    try:
        from cai.view.app import allowed_hosts, create_app
    except ImportError as exc:
        raise CaiError(f"the viewer needs the view extra (pip install 'cai[view]'): {exc}") from None
    import uvicorn

    app_ = create_app(runs, allowed_hosts(host, tuple(allow_host or ())))
    try:  # an unknown address or a busy port is one clear line, before uvicorn starts
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise CaiError(f"cannot listen on {host!r}: not a name or address this machine knows "
                       f"({getattr(exc, 'strerror', None) or exc})", field="host") from None
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        field = "host" if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) else "port"
        raise CaiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                       field=field) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host}, not only to this machine", err=True)
    typer.echo(f"cai view: http://{host}:{port}/  (Ctrl-C stops it)", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("export")
@user_errors
def export_cmd(file: Path, out: Path = typer.Option(..., "--out"),
               fmt: str = typer.Option("disk", "--format", help="disk (save_to_disk) or parquet"),
               overwrite: bool = typer.Option(False, "--overwrite",
                                              help="Replace an existing --out.")) -> None:
    """Export a stage's data.jsonl to a `datasets` folder or a parquet file."""
    from cai.core.records import export

    typer.echo(str(export(file, out, fmt, overwrite=overwrite)))


@app.command("demo")
@user_errors
def demo(out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/demo).")  # noqa: UP045
         ) -> None:
    """The README demo: `cai pipeline run configs/demo.yaml` on the embedded model."""
    from cai.pipeline import run_demo

    state = run_demo(out)
    typer.echo(f"report: {state.get('report')}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
