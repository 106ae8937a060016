#!/usr/bin/env bash
# The index tests and a long differential run against the native core built with
# AddressSanitizer and UndefinedBehaviorSanitizer (`make test-native-asan`, in CI). The
# sanitized build replaces the package's extension for the run and the normal one comes back
# afterwards, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CC=${CC:-gcc}
INC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SO=$($PY -c 'import kvroute.index._native as m; print(m.__file__)')
TMP=$(mktemp -d)
trap 'cp "$TMP/normal.so" "$SO" 2>/dev/null || true; rm -rf "$TMP"' EXIT
cp "$SO" "$TMP/normal.so"
$CC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -std=gnu11 -fPIC -shared \
    -I"$INC" src/kvroute/index/_native.c -o "$TMP/asan.so"
cp "$TMP/asan.so" "$SO"
export LD_PRELOAD="$($CC -print-file-name=libasan.so) $($CC -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export KVROUTE_INDEX_IMPL=native KVROUTE_DIFFERENTIAL_SEEDS=200 KVROUTE_TOKEN_FUZZ_EXAMPLES=5000
export KVROUTE_INGEST_FUZZ_PAYLOADS=50000
$PY -m pytest tests/unit/index tests/fuzz -q -p no:cacheprovider
