#!/usr/bin/env bash
# One set-up for npm start/test/bench/setup: install the Debian packages the real peers come from,
# install npm packages when node_modules is missing or stale, then build. Idempotent and quiet when
# nothing is missing. `--build-only` (scripts/vtpm, when a source is newer than the build) only builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build() {
  # The stamp takes the time the build started: a source edited during the build is seen as stale.
  mkdir -p dist
  touch dist/.vtpm-build.new
  node node_modules/typescript/bin/tsc -p tsconfig.json >&2
  mv dist/.vtpm-build.new dist/.vtpm-build
}
if [[ "${1:-}" == --build-only ]]; then
  build
  exit 0
fi

# Debian packages: libtpms is the TPM we run; the rest are the real clients and peers the tests and
# benchmarks talk to (tpm2-tools, swtpm, xenstore-utils, QEMU with a kernel and busybox to boot);
# strace lets the manager's tests see that a save is fsync'd before it is acknowledged.
# prometheus (promtool) checks the metrics exposition; tshark decodes captures (docs/observability.md).
pkgs=(libtpms0 tpm2-tools libtss2-tcti-swtpm0 swtpm swtpm-tools xenstore-utils qemu-system-x86
      linux-image-amd64 busybox-static strace cpio etcd-server prometheus tshark)
missing=()
for p in "${pkgs[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$st" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  line="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "vtpm-split set-up: missing Debian packages: ${missing[*]}" >&2
    echo "run as root:  $line" >&2
    exit 1
  fi
  echo "vtpm-split set-up: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# npm packages: reinstall when package.json or the lock file changed since the last install.
# `npm ci` installs the lock file as committed and never rewrites it (set-up must not change tracked
# files); the committed lock lists every platform's optional packages (rollup's), as npm writes it.
stamp=node_modules/.vtpm-split-lock
lockhash() { cat package.json package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1; }
if [[ ! -d node_modules || ! -f $stamp || "$(cat "$stamp")" != "$(lockhash)" ]]; then
  echo "vtpm-split set-up: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
  lockhash > "$stamp"
fi

build
