"""Checks Tessera's model against PyTorch and writes the golden fixture that `cargo test` uses.

Usage (from the repository root):

    cargo run --release -p tessera-host -- train --config tiny --steps 20 --backend cpu --out /tmp/tessera-ref
    python3 tools/reference/make_fixture.py /tmp/tessera-ref crates/core/tests/fixtures/reference_tiny.safetensors

It loads the Tessera checkpoint (safetensors + JSON sidecar) into the identical PyTorch model,
takes a fixed batch, and records: the weights, the batch, the logits and loss, every parameter's
gradient, the global gradient norm, and the weights after one AdamW step (with clipping and
weight decay as Tessera applies them). The Rust test `reference` recomputes all of them with burn
and compares at relative tolerance 1e-4. Needs `pip install torch safetensors numpy`.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from gpt import GPT, adamw  # noqa: E402


def main(ckpt_dir, out_path):
    meta = json.load(open(os.path.join(ckpt_dir, "checkpoint.json")))
    mcfg, tcfg = meta["model"], meta["train"]
    torch.manual_seed(0)
    model = GPT(mcfg).double()
    weights = load_file(os.path.join(ckpt_dir, meta["weights_file"]))
    model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=True)
    # Fixed batch: 3 rows of the model's context, tokens from a seeded generator.
    g = torch.Generator().manual_seed(1234)
    b, t = 3, mcfg["block_size"]
    tokens = torch.randint(0, mcfg["vocab_size"], (b, t + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    # float64 reference, so the fixture's own rounding is negligible against 1e-4.
    logits, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    total_norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))

    step_cfg = dict(tcfg)
    step_cfg["lr"] = 1e-3
    opt = adamw(model, step_cfg)
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
    opt.step()

    out = {}
    for n, w in weights.items():
        out[n] = w.float().contiguous()
    for n, p in model.named_parameters():
        out["grad." + n] = grads[n].float().contiguous()
        out["updated." + n] = p.detach().float().contiguous()
    out["input_ids"] = x.to(torch.int32)
    out["targets"] = y.to(torch.int32)
    out["logits"] = logits.detach().float().contiguous()
    out["loss"] = loss.detach().float().reshape(1)
    out["grad_norm"] = total_norm.detach().float().reshape(1)
    metadata = {
        "model": json.dumps(mcfg),
        "train": json.dumps(step_cfg),
        "torch": torch.__version__,
        "source": "tools/reference/make_fixture.py",
    }
    save_file(out, out_path, metadata=metadata)
    print(f"loss {loss.item():.6f}  grad norm {total_norm.item():.6f}  -> {out_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
