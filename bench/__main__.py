"""Run the benchmark suite: `python -m bench [--quick | --smoke] [--only NAMES] [--out DIR]`.

Starts everything it measures on 127.0.0.1 (a Redis unless --redis-url is given, the test
authorization server, `token-broker serve` processes, the baseline apps), runs the scenarios
one after another and writes DIR/latest.json and DIR/latest.png (default: bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from bench import chart, facade, fleet, hits, jwt_hits, limited, memory, profile, stampede, wrk
from bench.common import Caller, broker, broker_config, server, write_config
from bench.hits import LatencySettings, hit_url
from bench.wrk import WrkSettings
from tests.support import REPO_ROOT, AuthServerProcess

T = TypeVar("T")
EXIT_MISSED = 3  # ran to the end, but a target was missed (a crash exits 1)
SCENARIOS = ("hits", "l2", "facade", "limited", "jwt", "stampede", "fleet", "memory", "profile")


@dataclass(frozen=True)
class Mode:
    name: str
    workers: tuple[int, ...]
    rounds: int
    wrk: WrkSettings
    latency: LatencySettings
    references: bool
    stampede_requests: int
    fleet_clients: int
    fleet_lifetime: int
    fleet_lifetimes: int
    memory_entries: int
    memory_warm: int
    profile_seconds: float
    profile_starlette_path: bool


MODES = {
    "full": Mode(
        "full",
        (1, 2),
        3,
        WrkSettings(duration=10, warmup=2),
        LatencySettings(1000, 10, 2, 2),
        True,
        1000,
        20,
        10,
        3,
        10_000,
        200,
        8,
        True,
    ),
    "quick": Mode(
        "quick",
        (1, 2),
        2,
        WrkSettings(duration=5, warmup=1),
        LatencySettings(1000, 5, 1, 1),
        False,
        1000,
        20,
        4,
        3,
        2_000,
        200,
        4,
        False,
    ),
    "smoke": Mode(
        "smoke",
        (1,),
        1,
        WrkSettings(duration=1, warmup=0),
        LatencySettings(200, 1, 0, 1),
        False,
        50,
        2,
        3,
        1,
        60,
        10,
        1,
        False,
    ),
}


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        import redis

        redis.Redis.from_url(given).flushdb()
        yield given
        return
    from broker.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as embedded:
        yield embedded.url


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def _git() -> dict[str, Any]:
    def out(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": out("rev-parse", "--short", "HEAD"), "dirty": bool(out("status", "--porcelain", "broker"))}


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvicorn": version("uvicorn"),
        "starlette": version("starlette"),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "git": _git(),
    }


def _summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for workers, t in sorted(result.get("throughput", {}).items()):
        rows.append(
            {
                "figure": f"hit throughput, {workers} worker(s): broker/baseline rps (median)",
                "value": t["median_ratio"],
                "detail": f"broker {t['broker_rps']} vs baseline {t['baseline_rps']} rps",
                "target": f">= {t['target']} (stretch >= {t['stretch']})",
                "pass": t["pass"],
            }
        )
    if "latency" in result:
        lat = result["latency"]
        rows.append(
            {
                "figure": f"hit latency p99 at {lat['rate_rps']:.0f} rps open loop: broker - baseline (ms)",
                "value": lat["p99_delta_ms"],
                "detail": f"broker {lat['broker_p99_ms']} ms vs baseline {lat['baseline_p99_ms']} ms",
                "target": f"<= {lat['target_delta_ms']}",
                "pass": lat["pass"],
            }
        )
    if "l2" in result:
        l2 = result["l2"]
        rows.append(
            {
                "figure": "L2 hits (L1 off, 1 worker): broker/baseline rps, encrypted | plaintext",
                "value": f"{l2['encrypted_ratio']} | {l2['plaintext_ratio']}",
                "detail": f"encrypted {l2['encrypted_rps']} vs plaintext {l2['plaintext_rps']} rps;"
                f" encryption costs {l2['encryption_cost'] * 100:.1f} % of L2-hit throughput",
                "target": "report",
                "pass": l2["pass"],
            }
        )
    if "facade" in result:
        f = result["facade"]
        rows.append(
            {
                "figure": "facade hit throughput, 1 worker: POST /oauth2/…/token rps / bare Starlette rps (median)",
                "value": f["median_ratio"],
                "detail": f"facade {f['facade_rps']} vs baseline {f['baseline_rps']} rps",
                "target": f">= {f['target']}",
                "pass": f["pass"],
            }
        )
    if "limited" in result:
        rl = result["limited"]
        rows.append(
            {
                "figure": "hits of a rate-limited caller (1 worker): broker/baseline rps",
                "value": rl["limited_ratio"],
                "detail": f"limited {rl['limited_rps']} vs unlimited {rl['unlimited_rps']} vs baseline"
                f" {rl['baseline_rps']} rps; counting costs {rl['counting_cost'] * 100:.1f} % of hit throughput",
                "target": f">= {rl['target']}",
                "pass": rl["pass"],
            }
        )
    if "jwt" in result:
        j = result["jwt"]
        rows.append(
            {
                "figure": "hits with a caller JWT (1 worker): broker/baseline rps",
                "value": j["jwt_ratio"],
                "detail": f"JWT {j['jwt_rps']} vs caller key {j['key_rps']} vs baseline {j['baseline_rps']} rps;"
                f" JWT/key {j['jwt_vs_key']}; {j['key_set_requests']} key set request(s)",
                "target": f">= {j['target']}",
                "pass": j["pass"],
            }
        )
    if "stampede" in result:
        s = result["stampede"]
        rows.append(
            {
                "figure": f"cold stampede, {s['requests']} requests on"
                f" {s['instances']}x{s['workers_per_instance']} workers: upstream requests",
                "value": s["upstream_requests"],
                "detail": f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms (upstream delay {s['upstream_delay_s']} s)",
                "target": "== 1",
                "pass": s["pass"],
            }
        )
    if "fleet" in result:
        f = result["fleet"]
        rows.append(
            {
                "figure": f"fleet of {f['clients']}: upstream requests per {f['token_lifetime_s']} s lifetime",
                "value": f["broker"]["upstream_per_lifetime"],
                "detail": f"broker {f['broker']['upstream_requests']} vs per-process library"
                f" {f['per_process_library']['upstream_requests']} in {f['lifetimes']} lifetimes",
                "target": "about 1 per lifetime whatever K (refresh-ahead: <= 2.5); library about K",
                "pass": f["pass"],
            }
        )
    if "memory" in result:
        m = result["memory"]
        rows.append(
            {
                "figure": f"memory: RSS bytes per cached scope set ({m['entries']:,} entries, one worker)",
                "value": m["rss_per_entry_bytes"],
                "detail": f"worker RSS {m['rss_worker_full_bytes'] / 2**20:.1f} MiB; in-process: L1 entry"
                f" {m['l1_entry_bytes']} B + pre-encoded response {m['fast_path_encoded_bytes']} B;"
                f" {m['beyond_bound']['extra_scope_sets']} more sets grew RSS by"
                f" {m['beyond_bound']['rss_growth_bytes'] / 2**20:.1f} MiB",
                "target": "bounded by l1_max_entries",
                "pass": m["pass"],
            }
        )
    if "profile" in result:
        p = result["profile"]["fast_path"]
        layers = p["self_by_layer"]
        rows.append(
            {
                "figure": "profile of L1 hits: share of samples in broker code (fast path + helpers)",
                "value": round(sum(v for k, v in layers.items() if k.startswith("broker")), 1),
                "detail": "uvicorn/httptools " + str(layers.get("uvicorn", 0)) + " %",
                "target": "report",
                "pass": True,
            }
        )
    return rows


def run(mode: Mode, only: set[str], out: Path, given_redis: str | None) -> dict[str, Any]:
    started = time.time()
    result: dict[str, Any] = {
        "schema": "token-broker-bench/1",
        "mode": mode.name,
        "started_at": datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": _machine(),
        "settings": {
            "wrk": vars(mode.wrk),
            "load_generator": wrk.generator(),
            "rounds": mode.rounds,
            "open_loop": vars(mode.latency),
            "uvicorn": "uvloop, httptools, access_log off, same worker count for broker and baseline",
        },
    }
    caller = Caller("bench")
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-"))

    def step(name: str, fn: Callable[[], T]) -> T:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        value = fn()
        print(f"[bench] {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
        return value

    with redis_url(given_redis) as redis, AuthServerProcess() as authserver:

        def config(name: str, cache: str = "") -> Path:
            return write_config(workdir, name, broker_config(redis, authserver.token_url, caller, cache=cache))

        base_config = config("broker.toml")
        if "hits" in only:
            result["throughput"] = {}
            for workers in mode.workers:
                _flush(redis)
                measured = step(
                    f"hits, {workers} worker(s)",
                    lambda w=workers: hits.run(
                        base_config,
                        caller,
                        w,
                        mode.rounds,
                        mode.wrk,
                        mode.latency if w == 1 else None,
                        references=mode.references,
                    ),
                )
                result["throughput"][str(workers)] = measured["throughput"]
                if "latency" in measured:
                    result["latency"] = measured["latency"]
        if "l2" in only:
            _flush(redis)
            l2_config = config("broker-no-l1.toml", "l1_max_entries = 0")
            result["l2"] = step(
                "L2 hits (L1 off), encrypted and plaintext",
                lambda: hits.run_l2(l2_config, caller, mode.rounds, mode.wrk),
            )
        if "facade" in only:
            _flush(redis)
            facade_config = write_config(
                workdir, "facade.toml", facade.facade_config(broker_config(redis, authserver.token_url, caller))
            )
            rounds = 1 if mode.name == "smoke" else 3  # issue 12: median of 3
            result["facade"] = step("facade", lambda: facade.run(facade_config, caller, rounds, mode.wrk))
        if "limited" in only:
            _flush(redis)
            limited_caller = Caller("limited")
            limited_config = write_config(
                workdir,
                "broker-limited.toml",
                broker_config(redis, authserver.token_url, caller) + limited.caller_table(limited_caller),
            )
            result["limited"] = step(
                "hits of a rate-limited caller",
                lambda: limited.run(limited_config, caller, limited_caller, mode.rounds, mode.wrk),
            )
        if "jwt" in only:
            _flush(redis)
            base_text = broker_config(redis, authserver.token_url, caller)
            result["jwt"] = step(
                "hits with a caller JWT",
                lambda: jwt_hits.run(
                    lambda name, text: write_config(workdir, name, text), base_text, caller, mode.rounds, mode.wrk
                ),
            )
        if "stampede" in only:
            _flush(redis)
            result["stampede"] = step(
                "stampede",
                lambda: stampede.run(
                    base_config,
                    caller,
                    authserver,
                    instances=2,
                    workers=2,
                    requests=mode.stampede_requests,
                    upstream_delay=0.2,
                ),
            )
        if "fleet" in only:
            _flush(redis)
            result["fleet"] = step(
                "fleet",
                lambda: fleet.run(
                    base_config,
                    caller,
                    authserver,
                    clients=mode.fleet_clients,
                    lifetime=mode.fleet_lifetime,
                    lifetimes=mode.fleet_lifetimes,
                ),
            )
        if "memory" in only:
            _flush(redis)
            result["memory"] = step(
                "memory",
                lambda: memory.run(
                    lambda n: config(f"memory-{n}.toml", f"l1_max_entries = {n}"),
                    caller,
                    entries=mode.memory_entries,
                    warm=mode.memory_warm,
                ),
            )
        if "profile" in only:
            _flush(redis)
            result["profile"] = step("profile", lambda: _profile(mode, base_config, caller, out))
    result["duration_s"] = round(time.time() - started, 1)
    result["summary"] = _summary(result)
    result["pass"] = all(row["pass"] for row in result["summary"])
    return result


def _profile(mode: Mode, config: Path, caller: Caller, out: Path) -> dict[str, Any]:
    from bench.common import CREDENTIAL, HIT_SCOPE, get_token

    found: dict[str, Any] = {}
    with broker(config, 1) as proc:
        assert proc.proc is not None
        get_token(f"{proc.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
        found["fast_path"] = profile.record(
            proc.proc.pid,
            hit_url(proc.url),
            caller.headers,
            mode.profile_seconds,
            out / "profile-fast-path.txt",
            mode.wrk,
        )
    if mode.profile_starlette_path:
        args = ["--config", str(config), "--workers", "1"]
        with server("bench.starlette_path", args, "/healthz") as slow:
            assert slow.proc is not None
            get_token(f"{slow.url}/v1/tokens/{CREDENTIAL}", caller, HIT_SCOPE)
            found["starlette_path"] = profile.record(
                slow.proc.pid,
                hit_url(slow.url),
                caller.headers,
                mode.profile_seconds,
                out / "profile-starlette-path.txt",
                mode.wrk,
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs (about 2 minutes)")
    size.add_argument("--smoke", action="store_true", help="a few seconds per scenario: checks that it all runs")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where latest.json/png go")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"), help="use this Redis (flushed!)")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a broker's, not ours: `serve` sets its own
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(mode, only, args.out, args.redis_url)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.no_chart:
        chart.render(result, args.out / "latest.png")
    for row in result["summary"]:
        mark = "ok  " if row["pass"] else "MISS"
        print(f"{mark} {row['figure']}: {row['value']}  ({row['detail']}; target {row['target']})")
    print(f"wrote {args.out / 'latest.json'} in {result['duration_s']} s")
    return 0 if result["pass"] else EXIT_MISSED


if __name__ == "__main__":
    sys.exit(main())
