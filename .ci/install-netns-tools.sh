#!/usr/bin/env bash
# Install what tests/integration/test_hosts.py uses to put peers on network stacks of their
# own and to break the links between them: ip (iproute2: netns, veth, bridge, routes) and
# nft (nftables: random packet loss; this CI kernel has no sch_netem). Idempotent: exits 0
# at once when both are there. Needs root, as the tests themselves do.
set -euo pipefail
if command -v ip >/dev/null 2>&1 && command -v nft >/dev/null 2>&1; then
    echo "netns tools already installed: $(ip -V), $(nft --version)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends iproute2 nftables >/dev/null
ip -V
nft --version
