#!/usr/bin/env bash
# Installs the Debian packages convirt builds and runs on, when any is missing, then oneDNN 3
# (scripts/install-onednn.sh: a site's install, or Intel's CPU build from PyPI, into .deps/onednn).
# Usage: scripts/install-deps.sh            (no-op when everything is present)
set -euo pipefail
packages=(libopenmpi-dev openmpi-bin libopenblas-dev libzstd-dev zlib1g-dev libjpeg-dev libpng-dev pkg-config iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# libgomp.so, the link-time name of oneDNN's OpenMP runtime (CDNNL links it: our parallel loops run on
# oneDNN's threads), ships with GCC's libgcc-N-dev, the one the Swift toolchain links with.
if ! ls /usr/lib/gcc/*/*/libgomp.so >/dev/null 2>&1; then
  gcc_version=$(ls /usr/lib/gcc/x86_64-linux-gnu 2>/dev/null | sort -V | tail -1)
  missing+=("libgcc-${gcc_version:-12}-dev")
fi
# pip fetches oneDNN's vendor build (and the test suite's Python references).
if ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
if [ ${#missing[@]} -eq 0 ]; then exec "$(dirname "$0")/install-onednn.sh"; fi
echo "installing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
# apt's own output (hundreds of lines of unpacking) goes to a log, shown only when it fails.
log=$(mktemp)
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "apt-get failed; the end of its output:" >&2
  tail -n 40 "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
for p in "${missing[@]}"; do
  echo "  $p $(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '(version unknown)')"
done
exec "$(dirname "$0")/install-onednn.sh"
