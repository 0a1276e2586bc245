#!/usr/bin/env python3
"""Stability of the relay's defaults from 1 to 50 participants with a 50x speed spread, in the
simulator (`tessera-sim`: the real coordinator and real training, a virtual clock, so 50
participants cost only their training compute and runs are deterministic).

    cargo build --release --workspace --bins
    python3 tools/bench/scaling.py                   # tiny on tinyshakespeare, 3 seeds
    python3 tools/bench/scaling.py --n 1,10 --seeds 1

Participant i of N runs at speed 50^(-i/(N-1)) (the fastest 1, the slowest 1/50; every unit
also costs --overhead-ms, as fetching weights does), everything else is the relay's default
(no tuning flag). Each run folds --tokens tokens; the table gives the final validation loss,
the worst loss after the curve first fell below 3 (a divergence shows there), the mean
staleness, and the inner steps of the slowest participant's units."""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1,2,5,10,25,50")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--spread", type=float, default=50.0)
    ap.add_argument("--overhead-ms", type=float, default=50.0)
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.n.split(",")]:
        speeds = [a.spread ** (-i / (n - 1)) if n > 1 else 1.0 for i in range(n)]
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = subprocess.run(
                [os.path.join(BIN, "tessera-sim"), "--config", a.config, "--data", DATA,
                 "--tokens", str(a.tokens), "--no-decay", "--participants", str(n),
                 "--speeds", ",".join(f"{s:.6f}" for s in speeds), "--overhead-ms",
                 str(a.overhead_ms), "--seed", str(seed), "--eval-every", "5",
                 "--eval-iters", "20", "--json"],
                capture_output=True, text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            curve = [l for _, l in d["curve"]]
            fell = next((i for i, l in enumerate(curve) if l < 3.0), None)
            worst = max(curve[fell:]) if fell is not None else float("nan")
            r = {"participants": n, "seed": seed, "val_loss": round(d["val_loss"], 4),
                 "worst_after_fall": round(worst, 4), "versions": d["versions"],
                 "mean_staleness": round(d["mean_staleness"], 3), "rejected": d["rejected"],
                 "accepted": d["accepted"], "slowest_unit_steps": d["slowest_unit_steps"]}
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| participants | speeds | val loss (seeds) | worst after falling below 3 | mean staleness | rejected | slowest unit (steps) |")
    print("|---|---|---|---|---|---|---|")
    for n in sorted({r["participants"] for r in rows}):
        rs = [r for r in rows if r["participants"] == n]
        vals = ", ".join(f"{r['val_loss']:.3f}" for r in rs)
        print(f"| {n} | 1 … 1/{a.spread:g} | {vals} | {max(r['worst_after_fall'] for r in rs):.3f} "
              f"| {sum(r['mean_staleness'] for r in rs) / len(rs):.2f} | {sum(r['rejected'] for r in rs)} "
              f"| {min(r['slowest_unit_steps'] for r in rs)} |")


if __name__ == "__main__":
    sys.exit(main())
