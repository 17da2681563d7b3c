"""What one proxy hop costs in Python here, next to nginx and to luxsci-proxy, in one run.

    python bench/floor.py [--rounds N] [--seconds S]

The systems below take turns on CPU 0 (interleaved rounds, so a machine that
speeds up or slows down mid-run moves all of them), with wrk -c32 and the
upstream nginx on CPU 1, exactly as in run.py:

- nginx proxy: the reference hop (keep-alive pool);
- raw protocols: the leanest Python proxy, asyncio protocols and httptools both
  ways, no features (prototypes/raw_protocols.py): the floor;
- bare aiohttp: low-level server and one ClientSession, no features
  (prototypes/bare_aiohttp.py): the issue's reference prototype;
- luxsci-proxy: the product with its default features, as run.py starts it.

Prints the median CPU per request and requests/s per system, and each as a
ratio of the nginx proxy. bench/ANALYSIS.md quotes these figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import services as svc
import wrk

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    procs = svc.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="luxsci-floor-"))
    cores = svc.Cores.detect()
    print(f"pinning: {cores.describe()}")
    try:
        upstream = svc.start_upstream(procs, tmp, cores)
        systems = {
            "nginx proxy": svc.start_nginx(
                procs,
                "nginx-proxy",
                tmp,
                cores.sut,
                cores,
                lambda d, p: svc.nginx_proxy_conf(d, p, upstream.port),
            )
        }
        for name, script in (
            ("raw protocols", "raw_protocols.py"),
            ("bare aiohttp", "bare_aiohttp.py"),
        ):
            port = svc.free_port()
            workdir = tmp / script
            workdir.mkdir()
            argv = [
                *cores.taskset(cores.sut),
                sys.executable,
                str(HERE / "prototypes" / script),
                str(port),
                str(upstream.port),
            ]
            systems[name] = procs.spawn(name, argv, workdir, workdir / "out.log", port)
            svc.wait_port(systems[name])
        port, admin = svc.free_port(), svc.free_port()
        systems["luxsci-proxy"] = svc.start_proxy(
            procs, "proxy", tmp, cores.sut, cores, svc.proxy_config(port, admin, upstream.port)
        )

        load = cores.taskset(cores.load)
        cpu: dict[str, list[float]] = {name: [] for name in systems}
        rps: dict[str, list[float]] = {name: [] for name in systems}
        for round_ in range(args.rounds):
            for name, service in systems.items():
                url = f"http://127.0.0.1:{service.port}{svc.USER_PATH}"
                if round_ == 0:
                    wrk.run(load, url, 32, 1)  # warm-up: connections, caches, the login
                pids = svc.process_tree(service.pid)
                before = svc.cpu_seconds(pids)
                result = wrk.run(load, url, 32, args.seconds)
                used = svc.cpu_seconds(pids) - before
                if result.non_2xx or result.socket_errors:
                    print(f"warning: {name}: {result.non_2xx} non-2xx, {result.socket_errors}")
                cpu[name].append(used / result.requests * 1e6)
                rps[name].append(result.rps)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)

        ref_cpu = statistics.median(cpu["nginx proxy"])
        ref_rps = statistics.median(rps["nginx proxy"])
        print()
        print("| system | CPU µs/request (median) | x nginx | requests/s (median) | x nginx |")
        print("|---|---|---|---|---|")
        for name in systems:
            c, r = statistics.median(cpu[name]), statistics.median(rps[name])
            print(f"| {name} | {c:.0f} | {c / ref_cpu:.1f} | {r:,.0f} | {r / ref_rps:.3f} |")
        print(f"\n{args.rounds} interleaved rounds of wrk -t1 -c32 -d{args.seconds}s each")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
