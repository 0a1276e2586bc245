#!/usr/bin/env python3
"""Loads a `tessera-host export --hf DIR` folder with Hugging Face `transformers` and checks that
it computes what Tessera computes.

    pip install torch transformers safetensors      # CPU is enough
    python3 tools/check_hf_export.py DIR

It loads `GPT2LMHeadModel` and the tokenizer from DIR exactly as a user would, checks that the
tokenizer maps the reference text to its bytes (and back), runs the model on it and compares every
position's logits with Tessera's own (`tessera_logits.json`, written by the export) at 1e-4
(absolute and relative), and checks the safetensors metadata (`format: pt`, and the ledger
checkpoint when the export came from a relay). Exits 1 on the first mismatch.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GPT2LMHeadModel


def main(folder):
    folder = Path(folder)
    ref = json.loads((folder / "tessera_logits.json").read_text())
    model = GPT2LMHeadModel.from_pretrained(folder)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(ref["text"])["input_ids"][: len(ref["tokens"])]
    if ids != ref["tokens"]:
        sys.exit(f"tokenizer: {ids[:12]}... is not Tessera's {ref['tokens'][:12]}...")
    text = ref["text"].encode()[: len(ids)].decode(errors="replace")
    if tok.decode(ids) != text:
        sys.exit(f"tokenizer: decode gives {tok.decode(ids)!r}, not {text!r}")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    theirs = torch.tensor(ref["logits"], dtype=torch.float32).view(len(ids), ref["vocab_size"])
    diff = (logits - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    if not torch.allclose(logits, theirs, atol=1e-4, rtol=1e-4):
        sys.exit(f"logits differ: max |difference| {diff:.3g} (largest logit {scale:.3g})")
    with safe_open(folder / "model.safetensors", "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "pt":
        sys.exit(f"safetensors metadata format is {meta.get('format')!r}, not 'pt'")
    ledger = json.loads(meta["tessera_ledger"]) if "tessera_ledger" in meta else None
    print(
        f"transformers {__import__('transformers').__version__} loads {folder}: "
        f"{sum(p.numel() for p in model.parameters())} parameters, tokenizer = bytes, "
        f"logits of {len(ids)} positions within 1e-4 of Tessera's (max |difference| {diff:.2g}, "
        f"largest logit {scale:.3g})"
        + (f"; ledger checkpoint of version {ledger['version']} in the metadata" if ledger else "")
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
