"""Load test: starts a local server (the demo models), runs Locust headless against it for a bounded time, and
reports per request kind: requests, throughput, generated tokens/s, p50/p99 latency and failures by type.

    python -m load_tests.run --users 32 --duration 60 --out load-results

Writes load.json and load.md (and Locust's CSV, HTML and log) under --out and prints the table. Exits 1 on
any error (5xx, connection error, broken stream, other 4xx); 429/503 refusals are reported but allowed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .server import LocalServer, metric_sum

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REFUSALS = ("refused (429)", "refused (503)")  # Failure.REFUSED_*; the locustfile is not imported here (gevent)
# Locust imports torch (through star_serve's corpus module) and reads the corpus before its clock starts.
LOCUST_START_ALLOWANCE = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32, help="Concurrent simulated clients.")
    parser.add_argument("--spawn-rate", type=float, default=None, help="Users started per second (default: users/4).")
    parser.add_argument("--duration", type=int, default=60, help="Seconds of load, after the users start spawning.")
    parser.add_argument("--tenants", type=int, default=200, help="Size of the tenant pool.")
    parser.add_argument("--tenant-skew", type=float, default=1.1, help="Zipf exponent of tenant popularity.")
    parser.add_argument("--out", type=Path, default=Path("load-results"), help="Directory of the results.")
    return parser.parse_args(argv)


def run_locust(url: str, args: argparse.Namespace, summary_file: Path) -> int:
    spawn_rate = args.spawn_rate or max(1.0, args.users / 4)
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("--host", url, "--users", str(args.users), "--spawn-rate", str(spawn_rate)),
        *("--run-time", f"{args.duration}s", "--stop-timeout", "0"),
        *("--csv", str(args.out / "locust"), "--html", str(args.out / "locust.html")),
        *("--tenants", str(args.tenants), "--tenant-skew", str(args.tenant_skew)),
        *("--summary-file", str(summary_file)),
    ]
    with (args.out / "locust.log").open("wb") as log:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=args.duration + LOCUST_START_ALLOWANCE
        )
    return done.returncode


def errors_of(figures: dict[str, Any]) -> dict[str, int]:
    return {kind: n for kind, n in figures["failures"].items() if kind not in REFUSALS}


def render(results: dict[str, Any]) -> str:
    header = (
        "| kind | requests | ok | req/s | tokens/s | p50 ms | p99 ms | refused 429 | refused 503 | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for kind, figures in [*results["kinds"].items(), ("total", results["total"])]:
        failures = figures["failures"]
        errors = ", ".join(f"{name}: {n}" for name, n in errors_of(figures).items()) or "0"
        tokens = f"{figures['tokens_per_s']:.0f}" if figures["tokens"] else "-"
        rows.append(
            f"| {kind} | {figures['requests']} | {figures['ok']} | {figures['rps']:.2f} | {tokens} "
            f"| {figures['p50_ms']} | {figures['p99_ms']} | {failures.get(REFUSALS[0], 0)} "
            f"| {failures.get(REFUSALS[1], 0)} | {errors} |"
        )
    server = results["server"]
    notes = (
        f"\n{results['users']} users, {results['tenants']} tenants (Zipf skew {results['tenant_skew']}), "
        f"{results['window_s']:.0f} s of load. Latency: successful requests, streamed ones timed to their last "
        "event; tokens/s: tokens generated for successful requests (`usage`), over the whole run.\n"
        f"Server: {server['generated_tokens']:.0f} tokens generated ({server['tokens_per_s']:.0f} tokens/s by "
        f"`star_generated_tokens_total`), resident memory at the end {server['rss_mib']:.0f} MiB, "
        f"exit code after SIGTERM {server['exit_code']}.\n"
    )
    return header + "\n".join(rows) + "\n" + notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary_file = args.out / "locust-summary.json"
    summary_file.unlink(missing_ok=True)
    with LocalServer(args.out / "server.log") as server:
        tokens_before = metric_sum(server.metrics(), "star_generated_tokens_total")
        locust_code = run_locust(server.url, args, summary_file)
        time.sleep(1.0)  # lets the server see the disconnects of requests cut off at the end
        tokens_after = metric_sum(server.metrics(), "star_generated_tokens_total")
        rss = server.rss_bytes()
    if not summary_file.exists():
        print(f"Locust exited with {locust_code} and wrote no summary; see {args.out / 'locust.log'}", file=sys.stderr)
        return 1
    summary = json.loads(summary_file.read_text())
    window = summary["window_s"]
    generated = tokens_after - tokens_before
    results = {
        "users": args.users,
        "tenants": args.tenants,
        "tenant_skew": args.tenant_skew,
        "duration_s": args.duration,
        **summary,
        "server": {
            "generated_tokens": generated,
            "tokens_per_s": round(generated / window, 1) if window > 0 else 0.0,
            "rss_mib": round(rss / 2**20, 1),
            "exit_code": server.exit_code,
        },
        "locust_exit_code": locust_code,
    }
    table = render(results)
    (args.out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "load.md").write_text(table)
    print(table)
    errors = errors_of(results["total"])
    if errors or locust_code != 0:
        print(f"FAILED: errors {errors or 'none'}, Locust exit code {locust_code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
