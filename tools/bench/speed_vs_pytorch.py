"""Tokens/s of `tessera-host train --config baby` on CPU against PyTorch CPU running the identical
model, optimizer and batch shape with the same thread count, in one run.

    cargo build --release -p tessera-host
    python3 tools/bench/speed_vs_pytorch.py [--threads 2] [--steps 200]

Both sides train for the same number of steps (batch 12, the config's context, AdamW with
global-norm clipping, the config's dropout; `--config small` for nanoGPT's shakespeare_char) on tinyshakespeare; both times exclude start-up and the first 10 steps. Prints one
JSON line with both tokens/s figures and their ratio (Tessera / PyTorch), and Tessera with
burn's composed ops instead of the fused kernels (`--no-fused-kernels`) for the before / after;
`--baseline BIN` adds another tessera-host build (before a change) to the same interleaved run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
from gpt import GPT, adamw  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
CONFIGS = {
    "baby": dict(vocab_size=256, n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    "small": dict(vocab_size=256, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
}
CFG = CONFIGS["baby"]
BATCH = 12
TRAIN = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def tessera(threads, steps, warm, fused=True, binary=None):
    binary = binary or os.environ.get("TESSERA_HOST", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "tessera-host"))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))

    def run(n):
        out = subprocess.run(
            [binary, "train", "--config", CFG["name"], "--backend", "cpu", "--data", DATA, "--steps", str(n),
             "--batch", "12", "--eval-interval", "0", "--eval-iters", "1", "--json"]
            + ([] if fused else ["--no-fused-kernels"]),
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        return json.loads(out)

    # Subtract a short run from a long one: removes start-up and warm-up from the figure.
    short, long = run(warm), run(warm + steps)
    secs = long["wall_s"] - short["wall_s"]
    return steps * BATCH * CFG["block_size"] / secs


def pytorch(threads, steps, warm):
    torch.set_num_threads(threads)
    data = torch.tensor(list(open(DATA, "rb").read()), dtype=torch.long)
    torch.manual_seed(1337)
    model = GPT(CFG)
    opt = adamw(model, TRAIN)
    g = torch.Generator().manual_seed(0)

    def step():
        t = CFG["block_size"]
        ix = torch.randint(len(data) - t - 1, (BATCH,), generator=g)
        x = torch.stack([data[i:i + t] for i in ix])
        y = torch.stack([data[i + 1:i + t + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(warm):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * CFG["block_size"] / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="another tessera-host binary (a build before a change) to measure in the same run")
    a = ap.parse_args()
    global CFG
    CFG = dict(CONFIGS[a.config], name=a.config)
    # This machine's speed drifts by tens of percent over minutes: the three are interleaved
    # --repeat times and each figure is the median of its runs.
    runs = [(tessera(a.threads, a.steps, a.warm), tessera(a.threads, a.steps, a.warm, fused=False),
             pytorch(a.threads, a.steps, a.warm),
             tessera(a.threads, a.steps, a.warm, binary=a.baseline) if a.baseline else 0.0)
            for _ in range(a.repeat)]
    ours, composed, theirs, base = (statistics.median(r[i] for r in runs) for i in range(4))
    baseline = {"baseline_tokens_per_s": round(base), "ratio_baseline": round(base / theirs, 3)} if a.baseline else {}
    print(json.dumps({
        "config": a.config, "threads": a.threads, "steps": a.steps, "repeat": a.repeat,
        "tessera_tokens_per_s": round(ours), "pytorch_tokens_per_s": round(theirs),
        "ratio": round(ours / theirs, 3),
        "tessera_composed_ops_tokens_per_s": round(composed),
        "ratio_composed": round(composed / theirs, 3),
        **baseline,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
