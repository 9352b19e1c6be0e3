"""Two source trees of star-serve side by side: the servers of `bench adaptation (c)` (`off`, and `async` with
the product's defaults) started from each tree on the same checkpoint, under the same loads (32 tenants,
and one), in an order that rotates from repeat to repeat. Prints each server's median tokens/s and the
paired ratio of the second tree to the first (median over repeats of each repeat's ratio).

    python scripts/bench-releases.py OLD_TREE NEW_TREE --model DIR [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from star_serve.bench.adaptation import AdaptationBenchConfig
from star_serve.bench.cost import paired_ratio, rotated_runs, server_env
from star_serve.bench.server import BenchServer

MODES = {"off": {"STAR_ADAPTATION": "off"}, "async": {"STAR_ADAPTATION": "async"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = AdaptationBenchConfig(args.model, args.model, Path("."), repeats=args.repeats)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        servers: dict[str, BenchServer] = {}
        try:
            for tree, path in trees.items():
                for mode, env in MODES.items():
                    state = {"PYTHONPATH": str(path), "STAR_STATE_DIR": f"{tmp}/{tree}-{mode}"}
                    servers[f"{tree}/{mode}"] = BenchServer(args.model, {**server_env(cfg), **env, **state})
            loads, runs = rotated_runs(servers, cfg, print)
        finally:
            for server in servers.values():
                server.close()
    print("\n| tenants | server | old tokens/s | new tokens/s | new / old (paired) |")
    print("|---|---|---|---|---|")
    for n in loads:
        for mode in MODES:
            old, new = runs[n][f"old/{mode}"], runs[n][f"new/{mode}"]
            print(
                f"| {n} | {mode} | {statistics.median(old):.0f} | {statistics.median(new):.0f} | "
                f"{paired_ratio(new, old):.3f} |"
            )
        for tree in trees:
            ratio = paired_ratio(runs[n][f"{tree}/async"], runs[n][f"{tree}/off"])
            print(f"| {n} | {tree}: async / off | | | {ratio:.3f} |")


if __name__ == "__main__":
    main()
