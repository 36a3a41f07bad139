"""The viewer's web app: Starlette routes rendering Jinja2 templates, read-only.

Every page is rendered on the server and reads without JavaScript; filters are plain GET
forms. Safety: templates autoescape every value (red-team data is full of markup), a
Content-Security-Policy forbids scripts outright as a second guard, only GET is routed, and
files are served only from inside the run folders (anything else is 404).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from cai.view import compare as C
from cai.view import results as V
from cai.view import runs as R

CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
"""No script may run in a page, whatever a record contains."""

FACET_SCAN_BYTES = 16 << 20
"""Stages smaller than this list every filter choice (one full scan, cached)."""

_IMG = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _env() -> Environment:
    env = Environment(loader=PackageLoader("cai.view", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["num"] = _num
    env.filters["sig"] = lambda v: f"{v:.4g}" if isinstance(v, float) else _num(v)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f} %"
    return env


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _int(value: str | None, default: int = 1) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def report_figures(run: R.Run) -> list[str]:
    """The PNGs report.md shows, as paths inside the run."""
    md = run.safe_path("report.md")
    if md is None:
        return []
    out = []
    for ref in _IMG.findall(md.read_text(encoding="utf-8", errors="replace")):
        if run.safe_path(ref) is not None:
            out.append(ref)
    return list(dict.fromkeys(out))


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
"""Host headers the viewer answers by default: a page elsewhere that rebinds its own name
to 127.0.0.1 (DNS rebinding) gets 400, not the run's data."""


def allowed_hosts(host: str, names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Host headers to answer when bound to `host`: the loopback names, that address and the
    `names` the server was started with (`--allow-host`), nothing else. Bound to all
    interfaces, this machine's own name and addresses count as the address, so the guard
    against DNS rebinding holds for every `--host`: a page elsewhere whose name resolves to
    this machine still sends its own name and gets 400."""
    given = [h.strip().lower() for h in (host, *names) if h and h.strip()]
    if host in ("0.0.0.0", "::", ""):
        given = [h for h in given if h not in ("0.0.0.0", "::")] + _own_names()
    return list(dict.fromkeys([*LOCAL_HOSTS, *(f"[{h}]" if ":" in h and not h.startswith("[")
                                                else h for h in given)]))


def _own_names() -> list[str]:
    """This machine's host name, full name and addresses (what a browser on the network
    puts in Host when it reaches a server bound to all interfaces)."""
    import socket

    out: list[str] = []
    try:
        name = socket.gethostname()
        out += [name, socket.getfqdn(name)]
        out += socket.gethostbyname_ex(name)[2]
    except OSError:
        pass
    return [n.lower() for n in out if n]


def create_app(roots: list[str | Path], hosts: list[str] | None = None) -> Starlette:
    """The viewer over one run, or two (old, new) with a compare page; `hosts` are the Host
    headers it answers (default: loopback names only)."""
    if not 1 <= len(roots) <= 2:
        raise ValueError("give one run folder, or two to compare")
    runs = [R.Run(r) for r in roots]
    env = _env()

    def render(name: str, request: Request, **ctx: Any) -> HTMLResponse:
        html = env.get_template(name).render(runs=runs, request=request, **ctx)
        return HTMLResponse(html, headers=_headers())

    def run_of(request: Request) -> tuple[int, R.Run]:
        i = request.path_params.get("i", 0)
        if not 0 <= i < len(runs):
            raise HTTPException(404)
        return i, runs[i]

    async def home(request: Request) -> Response:
        if len(runs) == 2:
            return await compare(request)
        return await overview(request)

    async def overview(request: Request) -> Response:
        i, run = run_of(request)
        return render("overview.html", request, i=i, run=run, page="overview",
                      figures=report_figures(run),
                      has_report=run.safe_path("report.md") is not None,
                      has_html=run.safe_path("report.html") is not None)

    async def sl(request: Request) -> Response:
        i, run = run_of(request)
        qp = request.query_params
        folder = run.pick("sl", qp.get("stage"))
        flag, principle = qp.get("flag", ""), qp.get("principle", "")
        category, q = qp.get("category", ""), qp.get("q", "").strip()
        page = None
        options: dict[str, list[str]] = {}
        if folder is not None:
            path = folder.file("data.jsonl")
            match = R.sl_match(flag, principle, category, q)
            page = R.page_of(path, _int(qp.get("page")), match,
                             query_key=("sl", flag, principle, category, q),
                             prefilter=R.sl_prefilter(flag, principle, category, q))
            # Every choice from a full scan when the file is small; on a big one, the first
            # page's choices and the manifest's flag counts (the first page must stay fast).
            if path is None:
                options = {}
            elif R.file_size(path) < FACET_SCAN_BYTES:
                options = R.facets(path, R.sl_fields)
            else:
                options = _first_page_facets(page.rows, R.sl_fields)
                counted = [k.split(":", 1)[1] for k in folder.manifest.counts
                           if k.startswith(("flag:", "filter:"))]
                options["flag"] = sorted({*options.get("flag", []), *counted})
        return render("sl.html", request, i=i, run=run, page="sl", folder=folder, result=page,
                      flag=flag, principle=principle, category=category, q=q, options=options,
                      folders=run.of("sl"))

    async def labels(request: Request) -> Response:
        i, run = run_of(request)
        qp = request.query_params
        folder = run.pick("label", qp.get("stage"))
        flag, q = qp.get("flag", ""), qp.get("q", "").strip()
        sort = qp.get("sort", "")
        sort = sort if sort in R.SORTS else ""
        page = None
        if folder is not None:
            page = R.page_of(folder.file("data.jsonl"), _int(qp.get("page")),
                             R.label_match(flag, q), query_key=("label", flag, q, sort),
                             prefilter=R.label_prefilter(flag, q), sort=R.SORTS.get(sort))
            for rec in page.rows:
                rec["_orders"] = R.order_probs(rec)
                rec["_disagreement"] = R.disagreement(rec)
                rec["_confidence"] = R.confidence(rec)
        return render("labels.html", request, i=i, run=run, page="labels", folder=folder,
                      result=page, flag=flag, q=q, sort=sort, flags=R.LABEL_FLAGS,
                      folders=run.of("label"))

    async def training(request: Request) -> Response:
        i, run = run_of(request)
        return render("training.html", request, i=i, run=run, page="training",
                      folders=V.training(run))

    async def evaluation(request: Request) -> Response:
        i, run = run_of(request)
        return render("eval.html", request, i=i, run=run, page="eval",
                      ev=V.evaluation(run, request.query_params.get("stage")))

    async def compare(request: Request) -> Response:
        if len(runs) != 2:
            raise HTTPException(404)
        old, new = runs
        return render("compare.html", request, i=None, run=None, page="compare",
                      cdiff=C.constitution_diff(old, new), sl=C.compare_sl(old, new),
                      labels=C.compare_labels(old, new), counts=C.compare_counts(old, new))

    async def file(request: Request) -> Response:
        _, run = run_of(request)
        p = run.safe_path(request.path_params["path"])
        if p is None:
            raise HTTPException(404)
        return FileResponse(p, headers=_headers())

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return HTMLResponse(f"<!doctype html><title>{code}</title><p>{code}</p>", status_code=code,
                            headers=_headers())

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/compare", compare, methods=["GET"]),
        Route("/run/{i:int}/", overview, methods=["GET"]),
        Route("/run/{i:int}/sl", sl, methods=["GET"]),
        Route("/run/{i:int}/labels", labels, methods=["GET"]),
        Route("/run/{i:int}/training", training, methods=["GET"]),
        Route("/run/{i:int}/eval", evaluation, methods=["GET"]),
        Route("/run/{i:int}/file/{path:path}", file, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                     middleware=[Middleware(TrustedHostMiddleware,
                                            allowed_hosts=hosts or list(LOCAL_HOSTS))])


def _first_page_facets(rows: list[dict[str, Any]], fields: Any) -> dict[str, list[str]]:
    """Filter choices from the page at hand (the fast first page does not scan the file)."""
    seen: dict[str, set[str]] = {}
    for rec in rows:
        for k, vs in fields(rec).items():
            seen.setdefault(k, set()).update(v for v in vs if v)
    return {k: sorted(v) for k, v in seen.items()}


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def serve(roots: list[str | Path], host: str = "127.0.0.1", port: int = 8765,
          names: tuple[str, ...] = ()) -> None:
    """Serve the viewer with uvicorn until interrupted."""
    import uvicorn

    app = create_app(roots, allowed_hosts(host, names))
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["create_app", "serve", "report_figures", "allowed_hosts", "CSP"]
