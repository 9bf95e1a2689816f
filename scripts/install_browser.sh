#!/usr/bin/env bash
# Installs the headless browser the page's tests drive (tests/test_browser.py): the system's
# chromium and chromedriver (Debian/Ubuntu apt; run as root or with sudo). Does nothing when both
# are already there. Playwright's own browser download needs the internet; apt does not.
set -euo pipefail
if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get here; install chromium and chromedriver yourself" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver
