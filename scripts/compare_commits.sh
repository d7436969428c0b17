#!/usr/bin/env bash
# Compare the bitwise behaviour digests of two commits on this machine.
#
#   scripts/compare_commits.sh BASE [HEAD]      (HEAD defaults to the working tree)
#
# For refactors that must not change a single bit: both commits run the six fingerprint
# cases of the *current* tests/fingerprint.py (one torch thread, this checkout's .venv), each
# against its own source tree, and the digests of the final states and decision records are
# compared. Digests are only comparable on one machine (float results differ in the last
# bits between CPUs); across machines use the portable check (tests/test_fingerprint.py).
# Exit status: 0 when every case agrees, 1 when one differs, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: scripts/compare_commits.sh BASE [HEAD]" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
  echo "compare_commits: $PY not found; run 'make setup' first (or set PYTHON)" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'for t in "$work"/tree-*; do [[ -d $t ]] && git worktree remove --force "$t" >/dev/null 2>&1; done; rm -rf "$work"' EXIT
cp tests/fingerprint.py "$work/fingerprint.py"

digests_of() {  # $1: a commit, or "" for the working tree; prints "case state decisions"
  local src=$PWD/src
  if [[ -n $1 ]]; then
    local tree=$work/tree-$(git rev-parse --short "$1")
    git worktree add --detach --quiet "$tree" "$1"
    src=$tree/src
  fi
  (cd "$work" && PYTHONPATH="$src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 "$OLDPWD/$PY" -c \
    'import sys; sys.path.insert(0, "."); import fedalign, fingerprint
print("  source:", fedalign.__file__, file=sys.stderr)
sys.exit(fingerprint.main(["digests"]))')
}

base=$(git rev-parse --verify "$1^{commit}")
echo "BASE $1 ($base)"
digests_of "$base" > "$work/base.txt"
if [[ $# -eq 2 ]]; then
  head=$(git rev-parse --verify "$2^{commit}")
  echo "HEAD $2 ($head)"
  digests_of "$head" > "$work/head.txt"
else
  echo "HEAD working tree"
  digests_of "" > "$work/head.txt"
fi
if diff <(sort "$work/base.txt") <(sort "$work/head.txt"); then
  echo "identical: $(wc -l < "$work/base.txt") cases, final states and decision records"
else
  echo "the digests above differ (< BASE, > HEAD)" >&2
  exit 1
fi
