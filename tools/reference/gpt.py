"""Tessera's GPT in PyTorch: nanoGPT's architecture with biases, the same names and layouts as a
Tessera safetensors checkpoint (a Tessera checkpoint loads with `load_state_dict` directly)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, n_head, dropout=0.0):
        super().__init__()
        self.n_head = n_head
        # Tessera's dropout: on each residual branch's output (none on attention weights).
        self.drop = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln_1(x)
        q, k, v = self.attn.c_attn(h).split(d, dim=2)
        heads = lambda z: z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        x = x + self.drop(self.attn.c_proj(y))
        return x + self.drop(self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["n_embd"]
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg["vocab_size"], d),
                wpe=nn.Embedding(cfg["block_size"], d),
                h=nn.ModuleList(
                    [Block(d, cfg["n_head"], cfg.get("dropout", 0.0)) for _ in range(cfg["n_layer"])]
                ),
                ln_f=nn.LayerNorm(d),
            )
        )
        # And on the embeddings' sum (cfg "dropout", 0 unless given: the fixtures use none).
        self.drop = nn.Dropout(cfg.get("dropout", 0.0))
        # GPT-2 initialisation, as in Tessera.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]))
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets=None):
        b, t = idx.shape
        tr = self.transformer
        x = self.drop(tr.wte(idx) + tr.wpe(torch.arange(t, device=idx.device)))
        for block in tr.h:
            x = block(x)
        logits = tr.ln_f(x) @ tr.wte.weight.T  # tied LM head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def adamw(model, cfg):
    """nanoGPT's optimizer: decay on matrices and embeddings, none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
    )
