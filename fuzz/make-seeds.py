#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target from the golden vectors in proto/tests/vectors."""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent
vectors = root.parent / "proto" / "tests" / "vectors"


def write(target, name, data):
    folder = root / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


for kind in ("requests", "responses"):
    for i, vector in enumerate(json.loads((vectors / f"{kind}.json").read_text())):
        frame = bytes.fromhex(vector["frame_hex"])
        write("frame", f"{kind}-{i:02}", frame)
        # bodies: one opcode byte, then the body (after the 32-byte header).
        write("bodies", f"{kind}-{i:02}", frame[5:6] + frame[32:])
for i, vector in enumerate(json.loads((vectors / "indicia.json").read_text())):
    write("indicium", f"indicia-{i:02}", bytes.fromhex(vector["indicium_hex"]))
