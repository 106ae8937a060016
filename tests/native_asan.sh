#!/usr/bin/env bash
# The index tests and a long differential run against the native core, and the event tests
# over the native receive loop, both built with AddressSanitizer and UndefinedBehaviorSanitizer
# (`make test-native-asan`, in CI). The sanitized builds replace the package's extensions for
# the run and the normal ones come back afterwards, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CC=${CC:-gcc}
INC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SO=$($PY -c 'import kvroute.index._native as m; print(m.__file__)')
RECV_SO=$($PY -c 'import kvroute.events._recv as m; print(m.__file__)')
TMP=$(mktemp -d)
trap 'cp "$TMP/normal.so" "$SO" 2>/dev/null || true; cp "$TMP/recv.so" "$RECV_SO" 2>/dev/null || true; rm -rf "$TMP"' EXIT
cp "$SO" "$TMP/normal.so"
cp "$RECV_SO" "$TMP/recv.so"
for pair in "src/kvroute/index/_native.c:$TMP/asan.so" "src/kvroute/events/_recv.c:$TMP/recv-asan.so"; do
    $CC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -std=gnu11 -fPIC -shared \
        -I"$INC" "${pair%%:*}" -o "${pair#*:}"
done
cp "$TMP/asan.so" "$SO"
cp "$TMP/recv-asan.so" "$RECV_SO"
export LD_PRELOAD="$($CC -print-file-name=libasan.so) $($CC -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export KVROUTE_INDEX_IMPL=native KVROUTE_RECEIVE_IMPL=native KVROUTE_DIFFERENTIAL_SEEDS=200 KVROUTE_TOKEN_FUZZ_EXAMPLES=5000
export KVROUTE_INGEST_FUZZ_PAYLOADS=50000
# The receive loop: its own tests, the slice loop's (take_run) and the subscriber's (the
# timing-bound CLI and flood tests stay in `make test`, where nothing slows them down).
$PY -m pytest tests/unit/index tests/fuzz tests/zmq/events/test_native_receive.py \
    tests/unit/events/test_tracker_runs.py \
    tests/zmq/events/test_subscriber_receive.py tests/zmq/events/test_subscriber.py \
    -q -p no:cacheprovider
