#!/usr/bin/env bash
# Installs the external tools the test suite needs, and only those that are missing:
#   promtool, prometheus (Debian package `prometheus`): check the metrics and the alerting
#             rules; a real Prometheus answers runbook gates' queries
#   chromium  (Debian package `chromium`):   drives the dashboard's browser test
#   curl, jq  (Debian packages `curl`, `jq`): the human runbooks use them, and a test runs them
#   node, npm (Debian packages `nodejs`, `npm`): run the real OpenID provider of the SSO
#             tests (tests/oidc/provider.js; the tests npm-install `oidc-provider` themselves)
# Idempotent: when both are on PATH it changes nothing. Installs with apt-get, as root
# or through sudo; exits non-zero with one clear line when it cannot.
set -euo pipefail

say() { printf 'test-tools: %s\n' "$*"; }
die() { printf 'test-tools: error: %s\n' "$*" >&2; exit 1; }

# tool -> the Debian package that provides it
declare -A PACKAGE=([promtool]=prometheus [prometheus]=prometheus [chromium]=chromium [curl]=curl [jq]=jq
                    [node]=nodejs [npm]=npm)

missing=()
for tool in "${!PACKAGE[@]}"; do
    if command -v "$tool" >/dev/null 2>&1; then
        say "$tool found at $(command -v "$tool")"
    else
        missing+=("$tool")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

packages=()
for tool in "${missing[@]}"; do
    packages+=("${PACKAGE[$tool]}")
done
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
wanted="${missing[*]} (Debian packages: ${packages[*]})"

if ! command -v apt-get >/dev/null 2>&1; then
    die "missing ${wanted}, and there is no apt-get here: install them yourself" \
        "(e.g. promtool from https://prometheus.io/download/, chromium from your package manager)"
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
    say "installing ${wanted} needs root: sudo will ask for your password"
    as_root=(sudo)
else
    die "missing ${wanted}: run this script as root (or with sudo) to install them," \
        "or install them yourself"
fi

say "installing ${wanted} with apt-get (this takes a minute)"
run_apt() {
    ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@"
}
run_apt update -qq || die "apt-get update failed"
run_apt install -y -qq --no-install-recommends "${packages[@]}" \
    || die "apt-get install ${packages[*]} failed"

for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "installed ${PACKAGE[$tool]} but $tool is still not on PATH"
    say "$tool installed at $(command -v "$tool")"
done
