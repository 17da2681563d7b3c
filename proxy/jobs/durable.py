"""The jobs feature assembled from the config and the proxy's shared parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.clock import ServerClock
from proxy.config import Config, JobsConfig, is_redis_store, jobs_keys
from proxy.jobs.callbacks import Deliverer
from proxy.jobs.gateway import JobGateway
from proxy.jobs.runner import Runner
from proxy.jobs.seal import Sealer
from proxy.jobs.store import JobStore, SqliteStore
from proxy.limits import RateLimiter
from proxy.observe.metrics import JobsState, Metrics
from proxy.pipeline.admission import Admission
from proxy.pipeline.attempts import Attempts, Sender
from proxy.schemes.base import AuthScheme


def store_path(cfg: JobsConfig, state_dir: Path, key: str) -> Path:
    """The SQLite file: jobs.store, else one per integration in the state directory (two
    integrations on one host must never run each other's jobs)."""
    return Path(cfg.store) if cfg.store else state_dir / f"jobs-{key}.db"


def store_location(cfg: JobsConfig, state_dir: Path, key: str) -> str:
    """jobs.store's Redis URL, or the SQLite file's path."""
    return cfg.store if is_redis_store(cfg.store) else str(store_path(cfg, state_dir, key))


def make_store(cfg: JobsConfig, location: str, key: str, *, runner: bool) -> JobStore:
    """The store at `location`. `runner`: for a proxy that runs jobs (the SQLite file's
    lock, Redis's heartbeat); else for the operator's CLI beside a running proxy.

    On Redis the integration's key names the keys (two integrations on one server must
    never run each other's jobs, as with their separate SQLite files)."""
    if is_redis_store(location):
        from proxy.jobs.redis_store import RedisStore  # Redis only when asked

        return RedisStore(
            location,
            key,
            cfg.max_jobs,
            cfg.visibility_timeout,
            runner=runner,
            min_replicas=cfg.redis_min_replicas,
            replica_timeout=cfg.redis_replica_timeout,
        )
    return SqliteStore(location, cfg.max_jobs if runner else 0, lock=runner)


def sealer_of(cfg: JobsConfig) -> Sealer:
    return Sealer(jobs_keys(cfg), encrypt=cfg.encrypt)


class DurableJobs:
    def __init__(
        self,
        cfg: Config,
        location: str,
        key: str,
        admission: Admission,
        sender: Sender,
        scheme: AuthScheme,
        limiter: RateLimiter,
        clock: ServerClock,
        metrics: Metrics,
    ) -> None:
        jobs = cfg.jobs
        self.store = make_store(jobs, location, key, runner=True)
        sealer = sealer_of(jobs)
        # The pipeline's own attempts; the runner asks for the limiter's background lane.
        self.attempts = Attempts(
            sender,
            scheme,
            limiter,
            clock,
            metrics,
            cfg.retry,
        )
        secret = jobs.callback_secret
        deliverer = (
            Deliverer(secret.get().encode(), jobs.callback_timeout)
            if jobs.callback_allow and secret is not None
            else None
        )
        self.runner = Runner(
            jobs,
            self.store,
            sealer,
            self.attempts,
            scheme,
            clock,
            metrics,
            deliverer,
            integration=cfg.integration or None,
        )
        self.gateway = JobGateway(jobs, self.store, sealer, admission, metrics, self.runner.wake)

    async def start(self) -> None:
        await self.store.open()
        try:
            await self.runner.start()
        except BaseException:
            await self.store.close()
            raise

    async def stop(self, grace: float) -> None:
        await self.runner.stop(grace)
        await self.store.close()

    def state(self) -> JobsState:
        return self.runner.state()

    def status(self) -> dict[str, Any]:
        return self.runner.status()
