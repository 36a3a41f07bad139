"""`cai view`: a local, read-only web viewer for run folders and for two runs side by side.

Needs the `view` extra (Starlette, uvicorn; Jinja2 is a core dependency): `pip install 'cai[view]'`.
"""

from __future__ import annotations


def create_app(roots, hosts=None):  # noqa: ANN001, ANN201 - thin re-export, typed in cai.view.app
    """The ASGI app over one run folder, or two (old, new)."""
    from cai.view.app import create_app as make

    return make(roots, hosts)


def serve(roots, host: str = "127.0.0.1", port: int = 8765) -> None:  # noqa: ANN001
    """Serve the viewer with uvicorn until interrupted."""
    from cai.view.app import serve as run

    run(roots, host=host, port=port)


__all__ = ["create_app", "serve"]
