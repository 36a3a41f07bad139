"""The resume → chunk → append loop every record-writing stage runs, and where it runs.

Work not yet on disk is processed in chunks; each chunk is appended (and fsynced) at once,
so a kill loses at most the chunks in flight and a rerun skips stored ids. The same loop
runs in this process or on a Ray actor pool (`Engine`); the records are the same.
`cai.core.stage` re-exports these for the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

from cai.core.errors import CaiError
from cai.core.records import JsonlStore

T = TypeVar("T")


@dataclass
class EngineFields:
    """Config fields of the stages that can run on Ray (sl, label, eval policies): speed
    knobs only, never part of a record's id."""

    engine: str = "local"
    """"local", or "ray": chunks run on a Ray actor pool, one model replica per actor (same
    records as local; joins $RAY_ADDRESS or starts a local cluster)."""
    workers: int = 2
    """Ray actors (model replicas) with --engine ray."""
    gpus_per_worker: float = 0.0
    """GPUs per Ray actor (set it to the vLLM tensor-parallel size on GPU clusters)."""
    ray_address: str | None = None
    """Ray cluster address (default $RAY_ADDRESS, else a local cluster)."""

    def check_engine(self) -> None:
        """Refuse a bad engine, worker count or GPU share when the config is read (the CLI
        and the pipeline call it through `cai.core.config.from_dict`), not after a model load;
        a Ray address that does not answer fails here too, within a timeout."""
        eng = Engine.of(self)
        if eng.name == "ray":
            from cai.core.distributed import check_ray_address

            check_ray_address(eng.address)


@dataclass(frozen=True)
class Engine:
    """Where a stage's chunks run: in this process, or on a Ray actor pool."""

    name: str = "local"
    """"local" or "ray"."""
    workers: int = 2
    """Ray actors (one backend replica each)."""
    gpus_per_worker: float = 0.0
    """GPUs per actor (vLLM tensor parallelism inside one replica needs that many)."""
    address: str | None = None
    """Ray cluster to join (default $RAY_ADDRESS, else a local cluster)."""

    @classmethod
    def of(cls, cfg: Any) -> Engine:
        """The engine fields of a stage config (`engine`, `workers`, ...), if it has them."""
        eng = cls(getattr(cfg, "engine", "local"), getattr(cfg, "workers", 2),
                  getattr(cfg, "gpus_per_worker", 0.0), getattr(cfg, "ray_address", None))
        if eng.name not in ("local", "ray"):
            raise CaiError("use local or ray", field="engine")
        if eng.workers < 1:
            raise CaiError("must be at least 1", field="workers")
        if not 0 <= eng.gpus_per_worker <= 64:
            raise CaiError("must be from 0 to 64", field="gpus_per_worker")
        return eng


def run_chunks(todo: Sequence[T], chunk_size: int, process: Callable[[list[T]], Iterable[Any]],
               store: JsonlStore, *, total: int | None = None, desc: str = "",
               unit: str = "record", engine: Engine | None = None) -> int:
    """Process work not yet stored in chunks; each chunk is appended (and fsynced) at once.

    A kill loses at most the chunks in flight; the caller's rerun skips stored ids. With a
    Ray engine `process` must be picklable (a `cai.core.distributed.ChunkTask`). Returns how many
    records were written.
    """
    if chunk_size < 1:
        raise CaiError("must be at least 1", field="chunk_size")
    if engine is not None and engine.name == "ray":
        from cai.core.distributed import run_ray

        return run_ray(todo, chunk_size, process, store, workers=engine.workers,
                       gpus_per_worker=engine.gpus_per_worker, address=engine.address,
                       total=total, desc=desc, unit=unit)
    total = len(todo) if total is None else total
    written = 0
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = list(todo[start:start + chunk_size])
            written += store.append(process(chunk))
            bar.update(len(chunk))
    return written


__all__ = ["Engine", "EngineFields", "run_chunks"]
