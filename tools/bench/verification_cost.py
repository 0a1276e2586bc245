#!/usr/bin/env python3
"""What verification costs the relay, against the training compute it verifies: a relay with
its defaults and N honest native hosts fold --tokens tokens; then /api/status's verification
block (probe and re-execution seconds on the relay) is set against the participants' training
time (each participant's tokens over its measured tokens/s).

    cargo build --release --workspace --bins
    python3 tools/bench/verification_cost.py                       # tiny, 3 hosts, 1.2M tokens
    python3 tools/bench/verification_cost.py --config baby --tokens 400000
    python3 tools/bench/verification_cost.py --verifiers 1   # the last host also verifies

With --verifiers K the last K hosts run `tessera-host join --verifier` and the relay trusts
their keys (--trusted-verifier): the relay's re-execution seconds fall by what they take on
(verifier_checks), their training time counting as the participants' like any other.

Also reports what the honest run lost to verification: refused updates, bans, forfeited
tokens (all should be 0) and the share of updates held or audited."""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1_200_000)
    ap.add_argument("--corpus", default=None, help="a text file (default: the embedded corpus)")
    ap.add_argument("--verifiers", type=int, default=0, help="of the hosts, how many also verify")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tessera-verify-")
    port = free_port()
    host = os.path.join(BIN, "tessera-host")
    keys = [os.path.join(work, f"h{i}.key") for i in range(a.hosts)]
    verifiers = list(range(a.hosts - a.verifiers, a.hosts))
    relay_cmd = [os.path.join(BIN, "tessera-relay"), "--listen", f"127.0.0.1:{port}",
                 "--db", os.path.join(work, "relay.db"),
                 "--checkpoints", os.path.join(work, "checkpoints"), "--config", a.config,
                 "--max-tokens", str(a.tokens), "--inner-lr-decay-tokens", str(a.tokens)]
    if a.corpus:
        relay_cmd += ["--data", a.corpus]
    for i in verifiers:
        vid = subprocess.run([host, "id", "--key", keys[i]], check=True, capture_output=True,
                             text=True).stdout.strip()
        relay_cmd += ["--trusted-verifier", vid]
    relay = subprocess.Popen(relay_cmd, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(work, "relay.log"), "w"))
    procs = [relay]
    try:
        for _ in range(100):
            try:
                status(port)
                break
            except OSError:
                time.sleep(0.1)
        for i in range(a.hosts):
            procs.append(subprocess.Popen(
                [host, "join", f"ws://127.0.0.1:{port}/ws", "--backend", "cpu", "--key", keys[i]]
                + (["--verifier"] if i in verifiers else []),
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"h{i}.log"), "w")))
        start = time.time()
        while True:
            s = status(port)
            if (not s["leases"] and s["round"]["updates"] == 0
                    and s["tokens_applied"] >= 0.98 * a.tokens
                    and s["verification"]["held"] == 0):
                break
            time.sleep(1)
        wall = time.time() - start
        v = s["verification"]
        train_s = sum(p["tokens_trained"] / p["tokens_per_s"]
                      for p in s["participants"] if p["tokens_per_s"] > 0)
        out = {
            "config": a.config,
            "hosts": a.hosts,
            "verifiers": a.verifiers,
            "verifier_checks": v["verifier_checks"],
            "tokens_applied": s["tokens_applied"],
            "accepted": s["accepted_updates"],
            "rejected": s["rejected_updates"],
            "banned": v["banned"],
            "forfeited": sum(p["tokens_forfeited"] for p in s["participants"]),
            "rollbacks": len(s["guard"]["rollbacks"]),
            "probes": v["probes"],
            "probe_s": round(v["probe_seconds"], 2),
            "reexecutions": v["reexecutions"],
            "reexecute_s": round(v["reexecute_seconds"], 2),
            "participants_training_s": round(train_s, 1),
            "probe_pct": round(100 * v["probe_seconds"] / train_s, 2),
            "reexecute_pct": round(100 * v["reexecute_seconds"] / train_s, 2),
            "val_loss": s["val_loss"],
            "wall_s": round(wall, 1),
        }
        print(json.dumps(out))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
