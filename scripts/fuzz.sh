#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (wire_parse, core_sequence) with libFuzzer.
#
#   scripts/fuzz.sh [--install] [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600 (ten minutes); `scripts/fuzz.sh 20` is the short CI mode.
# TARGET defaults to every target. --install installs cargo-fuzz (`cargo install cargo-fuzz
# --locked`, from crates.io) when it is missing.
#
# Works on stable Rust: targets are built with `--sanitizer none`, which needs no nightly
# flag (cargo-fuzz passes only stable -C options then: sancov-module and its llvm-args). The
# library forbids unsafe code, so AddressSanitizer would only watch the dependencies; to use it
# anyway, on a nightly toolchain: FUZZ_TOOLCHAIN=nightly FUZZ_SANITIZER=address scripts/fuzz.sh
# (RUSTC_BOOTSTRAP=1 FUZZ_SANITIZER=address also works on stable, about 4x slower; a local
# experiment only, never CI: it unlocks unstable flags on a stable compiler.)
#
# Exits 0 with a line starting "fuzz: SKIPPED" when cargo-fuzz or a C++ compiler (libFuzzer is
# C++, built by libfuzzer-sys) is not available; exits 1 when a target fails to build or the
# fuzzer finds a crash (the input is left in fuzz/artifacts/<target>/).
#
# New corpus entries go to fuzz/work/<target>/ (ignored by git); the committed seeds in
# fuzz/corpus/<target>/ are read, never written. A crash is made a regression test by
# minimising it and saving it under fuzz/regressions/<target>/, which tests/fuzz_smoke.rs
# replays:
#   cargo fuzz tmin --sanitizer none <target> fuzz/artifacts/<target>/crash-...
#
# Environment: FUZZ_TOOLCHAIN (a rustup toolchain name, default: the current one),
# FUZZ_SANITIZER (default none), FUZZ_TARGET_DIR (cargo's target dir for the fuzz build,
# default fuzz/target), FUZZ_ARGS (extra libFuzzer arguments).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

install=0
if [ "${1:-}" = "--install" ]; then
    install=1
    shift
fi
secs="${1:-600}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [--install] [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(wire_parse core_sequence)
fi

skip() {
    echo "fuzz: SKIPPED: $*"
    exit 0
}

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || skip "no cargo on PATH"

cargo_tc=(cargo)
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    if ! rustup run "$FUZZ_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
        skip "toolchain '$FUZZ_TOOLCHAIN' is not installed"
    fi
    cargo_tc=(cargo "+$FUZZ_TOOLCHAIN")
fi
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    if [ "$install" = 1 ]; then
        echo "fuzz: installing cargo-fuzz"
        start=$SECONDS
        if ! cargo install cargo-fuzz --locked; then
            skip "cargo install cargo-fuzz failed"
        fi
        echo "fuzz: cargo-fuzz installed in $((SECONDS - start)) s"
    else
        skip "cargo-fuzz is not installed (cargo install cargo-fuzz --locked, or pass --install)"
    fi
fi
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 &&
    ! command -v clang++ >/dev/null 2>&1; then
    skip "no C++ compiler to build libFuzzer"
fi

# The fuzz crate is its own workspace; start it from the main crate's lock file so that both
# build the same dependency versions.
if [ ! -f fuzz/Cargo.lock ] && [ -f Cargo.lock ]; then
    cp Cargo.lock fuzz/Cargo.lock
fi

target_dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    target_dir=(--target-dir "$FUZZ_TARGET_DIR")
fi

echo "fuzz: $(cargo fuzz --version), $("${cargo_tc[@]}" --version), sanitizer $sanitizer"
start=$SECONDS
# Debug assertions and overflow checks are on (cargo-fuzz's default, made explicit).
for t in "${targets[@]}"; do
    if ! "${cargo_tc[@]}" fuzz build --sanitizer "$sanitizer" --debug-assertions \
        "${target_dir[@]}" "$t" >/dev/null; then
        echo "fuzz: building $t FAILED"
        exit 1
    fi
done
echo "fuzz: built ${targets[*]} in $((SECONDS - start)) s"

status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/corpus/$t" ] && seeds+=("fuzz/corpus/$t")
    [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
    # One log per run, so that runs side by side in one checkout do not mix their output.
    log="fuzz/work/$t.$$.log"
    echo "fuzz: running $t for $secs s"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of libFuzzer flags
    if "${cargo_tc[@]}" fuzz run --sanitizer "$sanitizer" --debug-assertions "${target_dir[@]}" \
        "$t" "fuzz/work/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        ${FUZZ_ARGS:-} >"$log" 2>&1; then
        # (-a: libFuzzer's log may hold raw bytes.)
        runs=$(grep -a '^stat::number_of_executed_units:' "$log" | tail -1 | tr -dc '0-9')
        rate=$(grep -a '^stat::average_exec_per_sec:' "$log" | tail -1 | tr -dc '0-9')
        cov=$(grep -ao 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
        echo "fuzz: $t ok: ${runs:-?} executions, ${rate:-?}/s, ${cov:-coverage not shown}"
        rm -f "$log"
    else
        status=1
        echo "fuzz: $t FAILED (full log: $log); last lines:"
        grep -av 'Uses: ' "$log" | tail -40
        newest=$(ls -t "fuzz/artifacts/$t" 2>/dev/null | head -1)
        if [ -n "$newest" ]; then
            echo "fuzz: artifact fuzz/artifacts/$t/$newest, in hex:"
            od -An -tx1 -v "fuzz/artifacts/$t/$newest" | tr -d ' \n' | head -c 20000
            echo
        fi
    fi
done
exit "$status"
