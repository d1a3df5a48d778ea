#!/usr/bin/env bash
# Builds the CLI and every test binary in release mode and stages them in
# stage/ (git-ignored) for the GPU machine, which has no Rust toolchain.
#
# Then, on the GPU machine (device tool: carry ["stage"]):
#   bash scripts/gpu-run.sh            # info, GPU tests, check, bench; logs in $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf stage && mkdir -p stage/tests
cargo build --release -p linkreduce-cli
cp target/release/linkreduce stage/
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe and msg.get("profile", {}).get("test"):
        name = msg["target"]["name"]
        kind = msg["target"]["kind"][0]
        shutil.copy(exe, os.path.join("stage/tests", f"{kind}-{name}"))
'
# The Python wheel (release, tested here without a GPU), for
# `pip install stage/wheels/*.whl` there: it has Python and torch, no Rust.
LINKREDUCE_WHEEL_PROFILE=release LINKREDUCE_WHEEL_OUT="$PWD/stage/wheels" bash scripts/python-check.sh
git rev-parse HEAD > stage/COMMIT 2>/dev/null || echo unknown > stage/COMMIT
git status --porcelain | grep -q . && echo "+uncommitted changes" >> stage/COMMIT || true
ls -la stage stage/tests
du -sh stage
