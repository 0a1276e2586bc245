#!/usr/bin/env python3
"""Learning parity: Tessera against fair baselines, baby config on tinyshakespeare, every run
with the same validation batches (50 batches of 12 x 64 from the validation split).

    cargo build --release --workspace --bins
    python3 tools/bench/parity.py                       # everything, 3 seeds
    python3 tools/bench/parity.py --only A,S --seeds 1  # a part of it

Runs (each participant does 500 inner steps of batch 12, i.e. 4 x 500 x 12 x 64 = 1,536,000
tokens in all, except B1 and B3):
  B1      one participant alone: `tessera-host train`, 500 steps, batch 12, lr in --b1-lrs
  B2      synchronous data parallel, 4x the batch: 500 steps of batch 48, lr in --b2-lrs
  B3      one node, 2000 steps of batch 12 (the foundation's reference)
  S       lockstep synchronous DiLoCo: the relay with --lockstep --updates-per-round 4, 4 hosts
  A       asynchronous Tessera: the relay's defaults, 4 hosts
  Amixed  as A, one of the 4 hosts throttled 8x (`tessera-host join --throttle 8`)
  H       A at every H in --h-sweep
S, A, Amixed and H stop handing out work at 1,536,000 tokens (`--max-tokens`) and decay the
inner learning rate over them (`--inner-lr-decay-tokens`); every other setting is the relay's
default unless --relay-args says otherwise. Its default is the recipe that won (BENCHMARKS.md,
"A global warmup of the inner learning rate"): H = 5 (the only H at which A meets all four of
issue #13's goals; `--h-sweep` adds 10, 25, 50 for A), inner lr 8e-3 warmed up over the first
30% of the tokens, outer Nesterov lr 0.7, momentum 0.8. Prints one JSON line per run and a summary table
(mean +- half the range over seeds)."""

import argparse
import collections
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
TOKENS = 4 * 500 * 12 * 64
EVAL = ["--eval-iters", "50"]
RECIPE = f"--inner-lr 8e-3 --inner-lr-warmup-tokens {TOKENS * 3 // 10} --outer-lr 0.7 --outer-momentum 0.8"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_train(seed, steps, batch, lr):
    cmd = [os.path.join(BIN, "tessera-host"), "train", "--config", "baby", "--data", DATA,
           "--backend", "cpu", "--steps", str(steps), "--batch", str(batch), "--lr", str(lr),
           "--seed", str(seed), "--eval-interval", "0", "--eval-batch", "12", *EVAL, "--json"]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"val_loss": summary["val_loss"], "wall_s": round(time.time() - t, 1)}


def status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as r:
        return json.load(r)


def relay_run(seed, h, throttles, relay_args):
    work = tempfile.mkdtemp(prefix="tessera-parity-")
    port = free_port()
    relay = subprocess.Popen(
        [os.path.join(BIN, "tessera-relay"), "--listen", f"127.0.0.1:{port}",
         "--db", os.path.join(work, "relay.db"), "--checkpoints", os.path.join(work, "ckpt"),
         "--config", "baby", "--data", DATA, "--seed", str(seed), "--inner-steps", str(h),
         "--max-tokens", str(TOKENS), "--inner-lr-decay-tokens", str(TOKENS), *EVAL,
         *relay_args],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "relay.log"), "w"))
    procs = [relay]
    try:
        for _ in range(300):
            try:
                status(port)
                break
            except OSError:
                time.sleep(0.2)
        start = time.time()
        for i, th in enumerate(throttles):
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "tessera-host"), "join", f"http://127.0.0.1:{port}/",
                 "--backend", "cpu", "--key", os.path.join(work, f"h{i}.key"),
                 "--throttle", str(th)],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"h{i}.log"), "w")))
        while True:
            time.sleep(2)
            s = status(port)
            h_ = s["val_loss_history"]
            done = (not s["leases"] and s["round"]["updates"] == 0
                    and s["tokens_applied"] >= TOKENS * 0.98
                    and h_ and h_[-1][0] == s["model_version"])
            if done:
                break
            if time.time() - start > 3600:
                raise RuntimeError(f"run did not finish: {json.dumps(s)[:2000]}")
        wall = time.time() - start
        db = sqlite3.connect(os.path.join(work, "relay.db"))
        stale = db.execute("SELECT AVG(staleness), MAX(staleness) FROM updates").fetchone()
        steps = db.execute("SELECT tokens FROM updates").fetchall()
        db.close()
        with open(os.path.join(work, "relay.log")) as f:
            log = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
        refusals = [line for line in log.splitlines() if " rejected: " in line]
        reasons = collections.Counter(
            m.group(1) for line in refusals for m in [re.search(r"reason=(\w+)", line)] if m)
        return {"val_loss": round(h_[-1][1], 4), "versions": s["model_version"],
                "tokens_applied": s["tokens_applied"], "accepted": s["accepted_updates"],
                "rejected": s["rejected_updates"], "rejected_for": dict(reasons),
                "rejections": [line.split(" rejected: ", 1)[1] for line in refusals[:5]], "rollbacks": len(s["guard"]["rollbacks"]),
                "mean_staleness": round(stale[0] or 0, 3), "max_staleness": stale[1],
                "min_unit_steps": min(t for (t,) in steps) // (12 * 64),
                "max_val_after_v5": round(max(l for v, l in h_ if v >= 5), 4),
                "wall_s": round(wall, 1)}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if os.environ.get("PARITY_KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--only", default="B1,B2,B3,S,A,Amixed,H")
    ap.add_argument("--h", type=int, default=5, help="inner steps H for S, A and Amixed")
    ap.add_argument("--h-sweep", default="10,25,50", help="further H for A (the H row)")
    ap.add_argument("--b1-lrs", default="1e-3,4e-3,1e-2")
    ap.add_argument("--b2-lrs", default="3e-3,1e-2,1.2e-2")
    ap.add_argument("--relay-args", default=RECIPE, help="tessera-relay flags for S, A, Amixed, H")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    only = set(a.only.split(","))
    extra = a.relay_args.split()
    runs = []
    if "B1" in only:
        for lr in a.b1_lrs.split(","):
            runs += [(f"B1 lr {lr}", s, lambda s, lr=lr: host_train(s, 500, 12, float(lr))) for s in seeds]
    if "B2" in only:
        for lr in a.b2_lrs.split(","):
            runs += [(f"B2 lr {lr}", s, lambda s, lr=lr: host_train(s, 500, 48, float(lr))) for s in seeds]
    if "B3" in only:
        runs += [("B3", s, lambda s: host_train(s, 2000, 12, 1e-3)) for s in seeds]
    if "S" in only:
        runs += [(f"S H={a.h}", s, lambda s: relay_run(s, a.h, [1] * 4, ["--lockstep", "--updates-per-round", "4", *extra])) for s in seeds]
    if "A" in only:
        runs += [(f"A H={a.h}", s, lambda s: relay_run(s, a.h, [1] * 4, extra)) for s in seeds]
    if "Amixed" in only:
        runs += [(f"A-mixed H={a.h}", s, lambda s: relay_run(s, a.h, [1, 1, 1, 8], extra)) for s in seeds]
    if "H" in only:
        for h in [int(x) for x in a.h_sweep.split(",") if x]:
            runs += [(f"A H={h}", s, lambda s, h=h: relay_run(s, h, [1] * 4, extra)) for s in seeds]
    results = {}
    for name, seed, fn in runs:
        r = fn(seed)
        r.update({"run": name, "seed": seed})
        print(json.dumps(r), flush=True)
        results.setdefault(name, []).append(r["val_loss"])
    print("\n| run | seeds | val loss (mean ± half range) | per seed |\n|---|---|---|---|")
    for name, vals in results.items():
        m = sum(vals) / len(vals)
        half = (max(vals) - min(vals)) / 2
        print(f"| {name} | {len(vals)} | {m:.4f} ± {half:.4f} | {', '.join(f'{v:.4f}' for v in vals)} |")


if __name__ == "__main__":
    sys.exit(main())
