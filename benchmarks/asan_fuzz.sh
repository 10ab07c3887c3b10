#!/usr/bin/env bash
# The C-boundary fuzz tests against AddressSanitizer + UndefinedBehaviorSanitizer builds of the C
# extensions (not run in CI: a sanitized build is a flag of this script, never left in the checkout).
#
#   benchmarks/asan_fuzz.sh [EXAMPLES] [pytest arguments...]
#
# Copies the working tree (tracked and new files, no builds) to a temporary directory, compiles the
# four extensions there with -fsanitize=address,undefined, and runs tests/test_c_boundary_*.py (each
# fuzz test EXAMPLES times, default 2000; every case in a child process, where a sanitizer report
# aborts the child and fails the test with the report) and the C decoder's own tests, with the
# sanitizer runtimes preloaded into Python. The temporary tree is removed afterwards unless
# KEEP_TREE=1.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
examples=${1:-2000}
shift || true
tree=$(mktemp -d /tmp/neoxja-asan.XXXXXX)
[ "${KEEP_TREE:-0}" = 1 ] || trap 'rm -rf "$tree"' EXIT

(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree")

include=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
flags=(-shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined
       -fno-sanitize-recover=undefined -I"$include")
# Each extension from the sources and flags pyproject.toml lists for it (its -O level replaced).
while IFS=$'\t' read -r name sources args; do
    read -ra extra <<< "$args"
    read -ra files <<< "$sources"
    gcc "${flags[@]}" "${extra[@]}" "${files[@]/#/$tree/}" -lm -lpthread -o "$tree/src/${name//.//}$suffix"
done < <(python - "$tree/pyproject.toml" <<'EOF'
import sys, tomllib
for ext in tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]["ext-modules"]:
    args = [a for a in ext.get("extra-compile-args", []) if not a.startswith("-O")]
    print(ext["name"], " ".join(ext["sources"]), " ".join(args), sep="\t")
EOF
)

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Python and torch keep memory until exit (no leak reports); a report aborts the process.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
# System malloc for Python objects, so that the sanitizer sees overruns of them (pymalloc hides them).
export PYTHONMALLOC=malloc
export NEOXJA_FUZZ_EXAMPLES=$examples NEOXJA_FUZZ_CASE_TIMEOUT=300
export PYTHONPATH="$tree/src"

cd "$tree"
python - <<'EOF'
import neoxja._decode, neoxja._dropout, neoxja._quant, neoxja._segment
for module in (neoxja._decode, neoxja._dropout, neoxja._quant, neoxja._segment):
    print("sanitized build:", module.__file__)
EOF
python -m pytest -q -p no:cacheprovider tests/test_c_boundary_quant.py tests/test_c_boundary_text.py \
    tests/test_c_boundary_decode.py tests/test_c_boundary_dropout.py tests/test_cpu_decode.py \
    tests/test_cpu_decode_verify.py \
    tests/test_dropout_attention.py "$@"
