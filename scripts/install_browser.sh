#!/usr/bin/env bash
# Installs the headless browser the atlas tests drive: Debian's chromium and its driver (not a downloaded build).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "chromium and chromedriver already installed"; exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium chromium-driver
