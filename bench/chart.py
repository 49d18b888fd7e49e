"""bench/results/latest.png: rps and p99, broker vs baseline, from a result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BASELINE, BROKER, SLOW, CEILING = "#9aa5b1", "#1f6feb", "#d29922", "#6e7781"


def _bars(ax: Any, groups: list[str], series: list[tuple[str, str, list[float | None]]], fmt: str) -> None:
    width = 0.8 / len(series)
    for i, (label, color, values) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        shown = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, shown, width, label=label, color=color)
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                ax.annotate(
                    fmt.format(value),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", ncols=2)


def render(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput: dict[str, Any] = result.get("throughput", {})
    latency: dict[str, Any] = result.get("latency", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))

    workers = sorted(throughput, key=int)
    groups = [
        f"{w} worker{'s' if w != '1' else ''}\nmedian paired ratio {throughput[w]['median_ratio']:.2f}x"
        for w in workers
    ]

    def med(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    series: list[tuple[str, str, list[float | None]]] = [
        ("baseline: bare Starlette route", BASELINE, [med(throughput[w]["baseline_rps"]) for w in workers]),
        ("broker (L1 hit)", BROKER, [med(throughput[w]["broker_rps"]) for w in workers]),
    ]
    if any("references" in throughput[w] for w in workers):
        refs = [throughput[w].get("references", {}) for w in workers]
        series.append(
            ("broker without fast path", SLOW, [r.get("broker_without_fast_path", {}).get("rps") for r in refs])
        )
        series.append(
            ("pure ASGI, pre-encoded (ceiling)", CEILING, [r.get("pure_asgi_preencoded", {}).get("rps") for r in refs])
        )
    _bars(left, groups, series, "{:,.0f}")
    left.set_title("Hit throughput, wrk: 1 thread, 32 keep-alive connections", fontsize=9)
    left.set_ylabel("requests/s (median of alternating runs)")
    left.set_ylim(0, max(v or 0 for _, _, vs in series for v in vs) * 1.35)

    p_groups: list[str] = []
    base_p99: list[float | None] = []
    broker_p99: list[float | None] = []
    if latency:
        p_groups.append(f"open loop {latency['rate_rps']:.0f} rps\n{latency['workers']} worker, p99")
        base_p99.append(latency["baseline_p99_ms"])
        broker_p99.append(latency["broker_p99_ms"])
    for w in workers:
        p_groups.append(f"wrk saturation\n{w} worker{'s' if w != '1' else ''}, p99")
        base_p99.append(throughput[w]["baseline_p99_ms"])
        broker_p99.append(throughput[w]["broker_p99_ms"])
    _bars(right, p_groups, [("baseline", BASELINE, base_p99), ("broker", BROKER, broker_p99)], "{:.2f}")
    right.set_title("Hit latency p99 (ms)", fontsize=9)
    right.set_ylabel("ms")
    right.set_ylim(0, max(v or 0 for v in base_p99 + broker_p99) * 1.3 or 1)

    notes = []
    if "stampede" in result:
        s = result["stampede"]
        notes.append(
            f"cold stampede: {s['requests']} requests, {s['instances']}x{s['workers_per_instance']} workers"
            f" -> {s['upstream_requests']} upstream request, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms"
        )
    if "fleet" in result:
        f = result["fleet"]
        notes.append(
            f"fleet of {f['clients']}, {f['lifetimes']} lifetimes of {f['token_lifetime_s']} s: upstream requests"
            f" broker {f['broker']['upstream_requests']},"
            f" per-process library {f['per_process_library']['upstream_requests']}"
        )
    if "memory" in result:
        m = result["memory"]
        notes.append(
            f"memory: {m['entries']:,} cached scope sets, worker RSS {m['rss_worker_full_bytes'] / 2**20:.0f} MiB,"
            f" {m['rss_per_entry_bytes']:,} bytes/entry"
        )
    title = f"token-broker benchmark ({result.get('mode', '?')} run, {result.get('started_at', '')[:10]})"
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.035 * len(notes), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
