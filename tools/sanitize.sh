#!/bin/sh
# Memory-safety check of the native core: build kvmirqfast with AddressSanitizer +
# UndefinedBehaviorSanitizer in a scratch copy of the source tree (the in-place build is left
# alone) and run the engine / churn / fault tests there.
#
#   tools/sanitize.sh                       # default test set
#   tools/sanitize.sh tests/test_churn.py   # any pytest arguments
#   KEEP=1 tools/sanitize.sh                # keep the scratch tree (path is printed)
#   REF=HEAD tools/sanitize.sh              # package sources from a git ref, not the work tree
#                                           # (tests always come from the work tree)
#
# CPython is not built with ASan, so libasan must be the first library loaded: LD_PRELOAD it.
# detect_leaks=0: the interpreter's own allocations at exit are not leaks of ours.
# Any ASan/UBSan report aborts the process, so a clean run == pytest's own exit status 0 and
# no "ERROR: AddressSanitizer" / "runtime error:" line in the log.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CC=${CC:-gcc}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvmirqfast-sanitize.XXXXXX")
LOG="$WORK/sanitize.log"
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# Sources only: no prebuilt .so or generated .c from the in-place build.
mkdir -p "$WORK/kvmirqfast/arch" "$WORK/kvmirqfast/include" "$WORK/tests"
if [ -n "${REF:-}" ]; then
    git -C "$SRC" archive "$REF" setup.py pyproject.toml README.md kvmirqfast | tar -x -C "$WORK"
    rm -f "$WORK"/kvmirqfast/*.so "$WORK"/kvmirqfast/*.c
else
    cp "$SRC/setup.py" "$SRC/pyproject.toml" "$SRC/README.md" "$WORK/"
    cp "$SRC"/kvmirqfast/*.py "$SRC"/kvmirqfast/*.pyx "$SRC"/kvmirqfast/*.pxd "$WORK/kvmirqfast/"
    cp "$SRC"/kvmirqfast/arch/*.py "$WORK/kvmirqfast/arch/"
    cp "$SRC"/kvmirqfast/include/*.h "$WORK/kvmirqfast/include/"
fi
cp "$SRC"/tests/*.py "$WORK/tests/"

echo "== building with -fsanitize=address,undefined in $WORK"
(cd "$WORK" && CC="$CC" KVMIRQFAST_SANITIZE=address,undefined \
    "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) || {
    cat "$WORK/build.log"; echo "SANITIZE: BUILD FAILED"; exit 2; }
for so in "$WORK"/kvmirqfast/_*.so; do
    nm -D "$so" | grep -q __asan_init || { echo "SANITIZE: $so is not instrumented"; exit 2; }
done

LIBASAN=$($CC -print-file-name=libasan.so)
LIBUBSAN=$($CC -print-file-name=libubsan.so)
if [ "$#" -eq 0 ]; then
    set -- tests/test_churn.py tests/test_faults.py
    for t in tests/test_engine.py tests/test_halt.py tests/test_vm.py tests/test_index.py; do
        [ -f "$WORK/$t" ] && set -- "$@" "$t"
    done
fi

echo "== running: pytest $*"
status=0
(cd "$WORK" && \
    LD_PRELOAD="$LIBASAN $LIBUBSAN" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    PYTHONFAULTHANDLER=1 \
    "$PY" -m pytest -q -p no:cacheprovider "$@" >"$LOG" 2>&1) || status=$?
tail -n 25 "$LOG"

reports=$(grep -cE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$LOG" || true)
if [ "$status" -eq 0 ] && [ "$reports" -eq 0 ]; then
    echo "SANITIZE: CLEAN (ASan+UBSan, 0 reports; pytest exit 0)"
else
    echo "SANITIZE: FAILED (pytest exit $status, $reports sanitizer reports)"
    grep -nE -A30 "ERROR: AddressSanitizer|runtime error:" "$LOG" | head -n 80 || true
    [ "$status" -ne 0 ] || status=1
fi
[ "${KEEP:-0}" = 1 ] && echo "scratch tree kept: $WORK (log: $LOG)"
exit "$status"
