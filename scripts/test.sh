#!/usr/bin/env bash
# Sets up .venv with the test extra and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# chromium + chromedriver for tests/test_browser.py (which fails without them, unless
# ASTROCLIP_SKIP_BROWSER=1): a machine without apt or root still runs the rest.
bash scripts/install_browser.sh || echo "warning: no headless browser; tests/test_browser.py will fail" >&2
# Two workers, each test file on one of them (module fixtures stay shared): most of a test's
# time is single-threaded (compiling, subprocess start-up), so two overlap well on 2 cores.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
