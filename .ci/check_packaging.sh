#!/usr/bin/env bash
# The install paths users take (docs/install.md), checked from the outside:
# 1. `make wheel` (pip wheel --no-build-isolation) builds a wheel whose metadata requires
#    exactly the torch it was built against, and carries py.typed and the binary;
# 2. that wheel installs into a fresh virtual environment (pip brings the pinned torch) and
#    `python -m embedding_ext` passes there, run from outside the source tree;
# 3. pip refuses that wheel next to another torch;
# 4. a plain `pip install .` (build isolation on) stops at once, saying to use
#    --no-build-isolation, instead of compiling against another torch.
# Uses $VENV (default .venv-cpu: the CPU-only torch, enough for packaging).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-cpu}
PY=$VENV/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "package-check: $*"; }

make -s wheel VENV="$VENV" WHEEL_DIR="$work/dist"
wheel=$(ls "$work"/dist/embedding_ext-*.whl)
torch_version=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")
say "built $(basename "$wheel") against torch $torch_version"
unzip -p "$wheel" '*.dist-info/METADATA' \
  | grep -qxF -e "Requires-Dist: torch==$torch_version" -e "Requires-Dist: torch===$torch_version" \
  || { say "FAIL: the wheel does not require torch==$torch_version"; exit 1; }
contents=$(unzip -Z1 "$wheel")
for f in embedding_ext/py.typed embedding_ext/_C.pyi embedding_ext/__main__.py; do
  grep -qx "$f" <<< "$contents" || { say "FAIL: $f missing from the wheel"; exit 1; }
done
grep -q '^embedding_ext/_C\..*\.so$' <<< "$contents" || { say "FAIL: no binary in the wheel"; exit 1; }
say "metadata pins torch==$torch_version; py.typed, _C.pyi, __main__ and the binary are in the wheel"

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"
(cd "$work" && "$work/venv/bin/python" -m embedding_ext) | tee "$work/selfcheck.log"
grep -q "^embedding_ext .*($work/venv/" "$work/selfcheck.log" \
  || { say "FAIL: the self-check did not import the installed package"; exit 1; }
(cd "$work" && "$work/venv/bin/python" -c "import embedding_ext as ee, importlib.metadata as m
assert ee.__version__ == m.version('embedding_ext'), (ee.__version__, m.version('embedding_ext'))") \
  || { say "FAIL: ee.__version__ is not the installed version"; exit 1; }
say "installed into a fresh venv; python -m embedding_ext passed there; ee.__version__ matches the metadata"

other=torch==2.14.1
[ "$torch_version" != 2.14.1 ] || other=torch==2.13.0
if "$work/venv/bin/python" -m pip install -q --dry-run "$wheel" "$other" > "$work/other.log" 2>&1; then
  say "FAIL: pip would install the wheel next to $other"; cat "$work/other.log"; exit 1
fi
grep -qi "conflict\|ResolutionImpossible" "$work/other.log" \
  || { say "FAIL: pip refused the wheel next to $other for another reason:"; cat "$work/other.log"; exit 1; }
say "pip refuses the wheel next to $other"

start=$SECONDS
if "$work/venv/bin/python" -m pip install --no-cache-dir . > "$work/isolated.log" 2>&1; then
  say "FAIL: an isolated 'pip install .' built"; exit 1
fi
grep -q "building needs the torch that will import it" "$work/isolated.log" \
  || { say "FAIL: the isolated build failed without saying why:"; cat "$work/isolated.log"; exit 1; }
say "plain 'pip install .' stops in $((SECONDS - start)) s, pointing to --no-build-isolation"
say "ok"
