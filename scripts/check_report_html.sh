#!/usr/bin/env bash
# Checks a `runner report --html` page in headless Chromium (see check_report_html.mjs):
#   scripts/check_report_html.sh RESULTS_DIR|REPORT.html [--screenshot OUT.png]
# RESULTS_DIR is the folder `runner report --html` wrote report.html into (an experiment
# folder, --results, or --out). Exit 0: the page works; 1: a check failed (one line says
# which); 2: bad arguments; 77: node, the npm packages (npm ci --prefix scripts) or Chromium
# are missing, so a caller can skip.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
target="$1"
shift
page="$target"
[[ -d "$target" ]] && page="$target/report.html"
if [[ ! -f "$page" ]]; then
    echo "check_report_html: $page: no such file (run \`runner report --html\` first)" >&2
    exit 2
fi
if ! command -v node >/dev/null 2>&1; then
    echo "check_report_html: skipped: node is not installed" >&2
    exit 77
fi
if [[ ! -d "$here/node_modules/playwright-core" ]]; then
    echo "check_report_html: skipped: playwright-core is not installed (run: npm ci --prefix scripts)" >&2
    exit 77
fi
run=(node "$here/check_report_html.mjs" "$page" "$@")
if command -v timeout >/dev/null 2>&1; then
    run=(timeout 180 "${run[@]}")
fi
exec "${run[@]}"
