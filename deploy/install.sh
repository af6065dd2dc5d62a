#!/usr/bin/env bash
# Installs what `mesh` needs on a Debian machine (run as root). Idempotent:
# apt-get runs only when a package is missing, and at most one `apt-get update`.
set -euo pipefail

# Run-time: iproute2 (ip), nftables (nft), util-linux (nsenter, unshare),
# procps (ps, sysctl). Test tools: ping, dig, iperf3, curl, tcpdump, python3,
# dnsmasq-base (an upstream DNS server in DNS tests; no service), dnsperf,
# wireguard-tools (`wg`: configures stock boringtun-cli in the encrypted bench).
packages=(iproute2 nftables iputils-ping dnsutils iperf3 curl tcpdump util-linux procps python3 dnsmasq-base dnsperf wireguard-tools)

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it installs Debian packages with apt-get)" >&2
    exit 1
fi
if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    echo "install.sh: this script supports Debian/Ubuntu (dpkg + apt-get); install by hand: ${packages[*]}" >&2
    exit 1
fi

missing=()
for p in "${packages[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) != installed ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
else
    echo "install.sh: system packages present"
fi

# Building needs a Rust toolchain; cargo may live in ~/.cargo/bin without being on PATH.
if ! command -v cargo >/dev/null && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if command -v cargo >/dev/null; then
    echo "install.sh: $(cargo --version)"
else
    cat >&2 <<'MSG'
install.sh: no Rust toolchain (cargo) found. Install one, then re-run:
    apt-get install -y cargo rustc        # Debian's packages (may be older than rust-version in Cargo.toml)
  or follow https://rustup.rs (rustup, the upstream installer).
MSG
    exit 1
fi
