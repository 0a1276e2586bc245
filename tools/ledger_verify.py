#!/usr/bin/env python3
"""An independent check of a Tessera contribution ledger export.

    python3 tools/ledger_verify.py DIR        # DIR from `tessera-host ledger export`

Written from the format's description (crates/protocol/src/ledger.rs), sharing no code with the
Rust verifier, so that the export is checked against its specification and not merely against
itself. It recomputes every leaf hash (RFC 6962: SHA-256(0x00 || leaf bytes)), the Merkle root at
every checkpoint's size (SHA-256(0x01 || left || right)), every stake-table root, and checks every
participant's signature of its update and the relay's signature of every checkpoint (Ed25519).
Prints the stake table; exits 1 with the reason on the first thing that does not hold.

Needs Python 3.9+ and `cryptography` (Debian: python3-cryptography).
"""

import hashlib
import json
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMULA = 1


class Invalid(Exception):
    pass


def u32(n):
    return struct.pack("<I", n)


def u64(n):
    return struct.pack("<Q", n)


def text(s):
    b = s.encode()
    return u32(len(b)) + b


def h(hexstr, n=32):
    b = bytes.fromhex(hexstr)
    if n is not None and len(b) != n:
        raise Invalid(f"{hexstr!r} is not {n} bytes")
    return b


def leaf_bytes(l):
    sig = h(l["signature"], None)
    return (
        b"tessera-leaf-v1"
        + text(l["run"])
        + u64(l["version"])
        + h(l["participant"])
        + u64(l["unit_id"])
        + u64(l["base_version"])
        + h(l["base_sha256"])
        + h(l["update_sha256"])
        + u64(l["tokens"])
        + u64(l["credit"])
        + u32(l["formula"])
        + u32(len(sig))
        + sig
    )


def update_message(l):
    return (
        b"tessera-update-v2"
        + u64(l["unit_id"])
        + u64(l["base_version"])
        + h(l["base_sha256"])
        + h(l["update_sha256"])
    )


def checkpoint_message(c):
    return (
        b"tessera-checkpoint-v1"
        + text(c["run"])
        + u64(c["version"])
        + u64(c["log_size"])
        + h(c["log_root"])
        + h(c["stake_root"])
        + u64(c["total_credit"])
    )


def leaf_hash(b):
    return hashlib.sha256(b"\x00" + b).digest()


def mth(hashes):
    """Merkle tree hash of a list of leaf hashes (RFC 6962 section 2.1)."""
    n = len(hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(hashes[:k]) + mth(hashes[k:])).digest()


def stake_root(table):
    entries = [
        leaf_hash(b"tessera-stake-v1" + key + u64(credit))
        for key, credit in sorted(table.items())
    ]
    return mth(entries)


def verify_sig(key, message, sig_hex, what):
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(h(sig_hex, 64), message)
    except (InvalidSignature, ValueError, Invalid) as e:
        raise Invalid(f"{what}: signature does not verify ({e or 'invalid'})")


def read_lines(path):
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise Invalid(f"{path.name} line {i + 1}: {e}")
    return out


def check(folder):
    info = json.loads((folder / "ledger.json").read_text())
    leaves = read_lines(folder / "leaves.jsonl")
    checkpoints = read_lines(folder / "checkpoints.jsonl")
    run, relay = info["run"], h(info["relay_key"])

    units = set()
    hashes = []
    for i, l in enumerate(leaves):
        where = f"leaf {i} (unit {l['unit_id']})"
        if l["run"] != run:
            raise Invalid(f"{where}: of run {l['run']!r}, not {run!r}")
        if l["unit_id"] in units:
            raise Invalid(f"{where}: this unit was already granted earlier in the log")
        units.add(l["unit_id"])
        if l["formula"] != FORMULA:
            raise Invalid(f"{where}: unknown credit formula {l['formula']}")
        if l["credit"] != l["tokens"]:
            raise Invalid(f"{where}: credit {l['credit']} is not its {l['tokens']} tokens")
        verify_sig(h(l["participant"]), update_message(l), l["signature"], where)
        hashes.append(leaf_hash(leaf_bytes(l)))

    prev = None
    table, counted, credit = {}, 0, 0
    for c in checkpoints:
        where = f"checkpoint of version {c['version']}"
        if c["run"] != run:
            raise Invalid(f"{where}: of run {c['run']!r}, not {run!r}")
        verify_sig(relay, checkpoint_message(c), c["signature"], where + " (relay)")
        if prev is not None:
            if c["version"] <= prev["version"]:
                raise Invalid(f"{where}: follows version {prev['version']}")
            if c["log_size"] < prev["log_size"]:
                raise Invalid(f"{where}: the log shrank from {prev['log_size']} leaves")
        size = c["log_size"]
        if size > len(hashes):
            raise Invalid(f"{where}: signs {size} leaves, the export has {len(hashes)}")
        if mth(hashes[:size]) != h(c["log_root"]):
            raise Invalid(
                f"{where}: its root is not that of the first {size} leaves "
                "(a leaf dropped, reordered, altered or inserted, or the history rewritten)"
            )
        for l in leaves[counted:size]:
            key = h(l["participant"])
            table[key] = table.get(key, 0) + l["credit"]
            credit += l["credit"]
        counted = size
        if stake_root(table) != h(c["stake_root"]) or credit != c["total_credit"]:
            raise Invalid(f"{where}: its stake table is not the one its leaves give")
        prev = c
    return info, leaves, checkpoints, table, len(leaves) - counted


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    folder = Path(sys.argv[1])
    try:
        info, leaves, checkpoints, table, unsigned = check(folder)
    except (Invalid, KeyError, ValueError, FileNotFoundError) as e:
        print(f"ledger does NOT verify: {e}", file=sys.stderr)
        sys.exit(1)
    total = sum(table.values())
    latest = checkpoints[-1]["version"] if checkpoints else None
    print(
        f"ledger of run {info['run']!r}: {len(leaves)} leaves, {len(checkpoints)} checkpoints "
        f"(latest version {latest}), {unsigned} leaves after it; all verified"
    )
    for key, c in sorted(table.items(), key=lambda kv: -kv[1]):
        print(f"  {key[:8].hex()}  {c:>12}  {100 * c / max(total, 1):6.2f}%")
    print("ledger verified")


if __name__ == "__main__":
    main()
