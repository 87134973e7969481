#!/usr/bin/env bash
# Installs Debian's chromium and its driver for tests/serve_test.py (the
# headless-browser test of `omnitrain_jax.serve`). Idempotent: returns at once
# when both are installed. Needs root (or sudo) and the Debian/Ubuntu archive.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
  chromium chromium-driver
chromium --version && chromedriver --version
