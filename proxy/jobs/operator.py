"""`luxsci-proxy jobs ...`: the operator's view of the job store.

Works beside a running proxy (SQLite lets a second process read and write, and so
does Redis; the proxy only moves jobs whose state is what it expects) or on a
stopped one. It
never prints a body, a path or a callback URL: what jobs carry may be protected
health information, and a terminal is not the place for it. It needs no key.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from proxy import console
from proxy.jobs.errors import StoreError
from proxy.jobs.model import TERMINAL, Job, State, iso
from proxy.jobs.store import JobStore

EXIT_OK = 0
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    config_help = "YAML config file (default: $LUXSCI_PROXY_CONFIG)"
    listing = actions.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", choices=[s.value for s in State], help="only this state")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    show = actions.add_parser("show", help="one job as JSON")
    cancel = actions.add_parser("cancel", help="cancel a queued job")
    again = actions.add_parser(
        "retry", help="send an outcome_unknown or failed job again (your explicit choice)"
    )
    for sub in (show, cancel, again):
        sub.add_argument("id", help="the job's id")
    purge = actions.add_parser("purge", help="delete finished jobs older than keep_results")
    purge.add_argument(
        "--all-finished", action="store_true", help="delete every finished job, whatever its age"
    )
    for sub in (listing, show, cancel, again, purge):
        sub.add_argument("--config", help=config_help)
    actions.add_parser("keygen", help="print a new random AES-256 key for jobs.keys")


def keygen() -> int:
    console.say(base64.b64encode(os.urandom(32)).decode())
    return EXIT_OK


def _detail(job: Job) -> dict[str, Any]:
    return {
        **job.public(),
        "method": job.method,
        "scope": job.scope,
        "expires_at": iso(job.expires_at),
        "finished_at": iso(job.finished_at),
        "callback": job.callback_state,
    }


def _row(job: Job) -> str:
    status = "" if job.response_status is None else str(job.response_status)
    error = (job.last_error or "")[:60]
    created = iso(job.created_at) or ""
    return (
        f"{job.id}  {job.state.value:<15} {job.method:<7} {job.scope:<8} {created}  "
        f"{job.attempts:>3}  {status:>3}  {error}"
    )


def exists(path: Path) -> bool:
    if path.exists():
        return True
    console.say(f"error: no jobs store at {path} (the proxy makes it when jobs run)", sys.stderr)
    return False


async def run(
    args: argparse.Namespace, store: JobStore, max_age: float, keep_results: float
) -> int:
    """One action on `store` (a SQLite one must exist: see `exists`)."""
    try:
        await store.open()
        return await _act(store, args, max_age, keep_results)
    except StoreError as e:
        console.say(f"error: {e}", sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()


async def _act(store: JobStore, args: argparse.Namespace, max_age: float, keep: float) -> int:
    action = args.action
    now = time.time()
    if action == "list":
        state = State(args.state) if args.state else None
        jobs = await store.list(state, max(1, args.limit))
        console.say(
            f"{'ID':<32}  {'STATE':<15} {'METHOD':<7} {'SCOPE':<8} {'CREATED':<24}  "
            "TRY  ANS  LAST ERROR"
        )
        for listed in jobs:
            console.say(_row(listed))
        return EXIT_OK
    if action == "purge":
        before = now if args.all_finished else now - keep
        count = await store.purge(before, TERMINAL)
        console.say(f"purged {count} finished job(s)")
        return EXIT_OK
    job_id = args.id
    job: Job | None
    if action == "show":
        job = await store.get(job_id)
    elif action == "cancel":
        job = await store.cancel(job_id, now)
        if job is not None and job.state is not State.CANCELLED:
            console.say(
                f"error: job {job_id} is {job.state.value}; only a queued job can be cancelled",
                sys.stderr,
            )
            return EXIT_FAILED
    else:
        job = await store.get(job_id)
        if job is not None and job.state not in (State.OUTCOME_UNKNOWN, State.FAILED):
            console.say(
                f"error: job {job_id} is {job.state.value}; only an outcome_unknown or failed "
                "job can be sent again",
                sys.stderr,
            )
            return EXIT_FAILED
        if job is not None:
            job = await store.retry(job_id, now, max_age)
    if job is None:
        console.say(f"error: no job {job_id}", sys.stderr)
        return EXIT_FAILED
    console.say(json.dumps(_detail(job), indent=2))
    return EXIT_OK
