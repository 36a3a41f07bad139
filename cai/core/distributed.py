"""Ray Data engine: the same chunks a local run processes, spread over an actor pool.

A stage hands its work as a `ChunkTask`: a picklable callable that loads what it needs
(constitution, backend replica) once per actor and turns a chunk of work items into record
dicts (tasks that hold a model derive from `cai.backends.ReplicaTask`). The local engine
calls it in-process; the Ray engine runs one copy per actor (one backend replica each,
`gpus_per_worker` GPUs each) through `map_batches`, and the driver appends the records to
the stage's store as batches arrive. Because every sampled text depends only on its own
request's seed and inputs, both engines write the same records; because the driver's store
skips ids it already holds, a retried task or a restarted actor never writes a record twice,
and a rerun skips what is done.

`RAY_ADDRESS` (or `--ray-address`) joins an existing cluster; otherwise a local one starts.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from cai.core.errors import CaiError
from cai.core.records import JsonlStore

ENGINES = ("local", "ray")


class ChunkTask(Protocol):
    """Turns a chunk of work items into records; picklable, loads its models lazily."""

    def __call__(self, chunk: list[Any]) -> list[dict[str, Any]]: ...


class _RayWorker:
    """One actor: holds one copy of the task (and so one backend replica)."""

    def __init__(self, blob: bytes):
        self.task = pickle.loads(blob)
        marker = os.environ.get("CAI_RAY_WORKER_PIDS")
        if marker:  # tests find the workers' pids here to kill one mid-run
            with open(marker, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items = [pickle.loads(b) for b in batch["item"]]
        records = [r.model_dump(mode="json") if hasattr(r, "model_dump") else r
                   for r in self.task(items)]
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records],
                                   dtype=object)}


CONNECT_TIMEOUT_S = 10.0
"""How long a Ray cluster address may take to accept a connection and answer the gRPC
handshake ($CAI_RAY_TIMEOUT)."""
INIT_TIMEOUT_S = 120.0
"""How long joining a cluster (`ray.init` with an address) may take ($CAI_RAY_INIT_TIMEOUT):
past the handshake, Ray's own GCS client retries a silent peer without end."""
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS and its
client server both are) must answer with a SETTINGS frame of its own."""


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _unreachable(address: str, why: str, answer: str = "does not answer") -> CaiError:
    return CaiError(f"the Ray cluster at {address} {answer} ({why}); start it, fix the "
                    "address, or leave --ray-address and $RAY_ADDRESS unset to start a local "
                    "cluster", field="ray_address")


def check_ray_address(address: str | None = None, timeout: float | None = None) -> None:
    """Fail fast, in one line, when the Ray cluster to join does not answer.

    `ray.init` retries an unreachable or silent address for minutes (its GCS client without
    end); so the head (`host:port`, `ray://host:port`; $RAY_ADDRESS when no address is
    given) must accept a TCP connection and answer the HTTP/2 handshake every gRPC server
    answers, each within `timeout` seconds. "auto", "local" and no address at all start or
    find a local cluster and are not probed; with $RAY_USE_TLS only the connection is tried.
    """
    import socket

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address in ("auto", "local"):
        return
    if timeout is None:
        timeout = _seconds("CAI_RAY_TIMEOUT", CONNECT_TIMEOUT_S)
    client = address.startswith("ray://")
    host, sep, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        host, port = address.removeprefix("ray://").rstrip("/"), "10001" if client else "6379"
    host = host.strip("[]")
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise _unreachable(address, f"{why} within {timeout:g} s") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS handshake is Ray's own business
        try:
            conn.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                got = conn.recv(9 - len(head))
                if not got:
                    break
                head += got
        except TimeoutError:
            raise _unreachable(address, f"it accepts connections but says nothing to the gRPC "
                                        f"handshake within {timeout:g} s") from None
        except OSError as exc:
            raise _unreachable(address, f"the connection failed: {exc.strerror or exc}") from None
    if len(head) < 9 or head[3] != 4:  # frame type 4: SETTINGS
        raise _unreachable(address, "something else listens there, not a gRPC server; Ray's "
                                    "ports are GCS 6379 and ray:// 10001", "does not answer as Ray")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             timeout: float | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS) when given, else start a local cluster.

    Joining is bounded by `timeout` seconds ($CAI_RAY_INIT_TIMEOUT, default INIT_TIMEOUT_S):
    `ray.init` runs in a daemon thread, so a cluster that passes the handshake but never
    lets Ray connect is one error line, not a hang (the stuck thread dies with the process).
    A connection error from Ray is one line too.
    """
    import threading

    try:
        import ray
    except ImportError:
        raise CaiError("--engine ray needs Ray: pip install 'ray[data]' (make installs it)") from None
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_ray_address(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    if not address or address in ("auto", "local"):
        ray.init(**kwargs)  # a local cluster: nothing remote to wait for
        return
    if timeout is None:
        timeout = _seconds("CAI_RAY_INIT_TIMEOUT", INIT_TIMEOUT_S)
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=join, name="cai-ray-init", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _unreachable(address, f"Ray could not join it within {timeout:g} s; raise "
                                    "$CAI_RAY_INIT_TIMEOUT if the cluster is just slow")
    if failure:
        exc = failure[0]
        if isinstance(exc, ConnectionError | TimeoutError | RuntimeError):
            raise _unreachable(address, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                               if str(exc) else type(exc).__name__) from None
        raise exc


def run_ray(todo: Sequence[Any], chunk_size: int, task: ChunkTask, store: JsonlStore, *,
            workers: int = 2, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
            address: str | None = None, total: int | None = None, desc: str = "",
            unit: str = "record") -> int:
    """Process `todo` on a Ray actor pool; append each finished batch on the driver."""
    if workers < 1:
        raise CaiError("must be at least 1", field="workers")
    if not todo:
        return 0
    init_ray(address, num_cpus=max(workers, int(workers * cpus_per_worker)))
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ds = ray.data.from_items([{"item": pickle.dumps(x)} for x in todo],
                             override_num_blocks=max(1, min(len(todo), workers * 4)))
    out = ds.map_batches(
        _RayWorker, fn_constructor_args=(pickle.dumps(task),), batch_size=chunk_size,
        batch_format="numpy", concurrency=workers, num_gpus=gpus_per_worker or None,
        num_cpus=cpus_per_worker, max_restarts=-1, max_task_retries=-1)
    total = len(todo) if total is None else total
    written = 0
    with tqdm(total=total, initial=total - len(todo), desc=f"{desc} (ray x{workers})",
              unit=unit) as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            records = [json.loads(r) for r in batch["record"]]
            written += store.append(records)
            bar.update(len(records))
    return written


__all__ = ["ENGINES", "ChunkTask", "init_ray", "run_ray", "check_ray_address"]
