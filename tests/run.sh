#!/usr/bin/env bash
# Runs the whole test suite as CI does: installs what the tests drive (RabbitMQ from
# Debian's packages, kubectl, helm, Prometheus and Alertmanager into .tools/, minimal root filesystems from Debian's
# packages into .tools/rootfs/), builds the real Kubernetes control plane from Go modules
# (tests/control-plane/build.sh; a no-op once built), starts the broker if it is down,
# then `cargo test --workspace` (the operator and the simulator, testrunner-sim) with the
# control-plane tests included (`--include-ignored`).
# Arguments go to cargo test, those after `--` to the test harness (for example a test
# name, or `-- --nocapture`).
#
# Without Go, the control-plane half is skipped: cargo lists those tests as ignored, by
# name, with the reason. With CI=true a missing Go is an error instead.
# Works with CI=true and no stdin; installing RabbitMQ needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tools
bash tests/rootfs.sh
bash .ci/ensure-rabbitmq
export TESTRUNNER_KUBECTL="${TESTRUNNER_KUBECTL:-$PWD/.tools/kubectl/kubectl}"

cargo_args=()
harness_args=()
seen_separator=0
for arg in "$@"; do
  if [[ $seen_separator == 0 && $arg == -- ]]; then
    seen_separator=1
  elif [[ $seen_separator == 0 ]]; then
    cargo_args+=("$arg")
  else
    harness_args+=("$arg")
  fi
done

if command -v "${GO:-go}" >/dev/null 2>&1; then
  bash tests/control-plane/build.sh
  target_dir=${CARGO_TARGET_DIR:-$PWD/target}
  [[ $target_dir == /* ]] || target_dir=$PWD/$target_dir
  export TESTRUNNER_CONTROL_PLANE="${TESTRUNNER_CONTROL_PLANE:-$target_dir/control-plane/bin}"
  harness_args=(--include-ignored "${harness_args[@]}")
elif [[ ${CI:-} == true ]]; then
  echo "tests/run.sh: Go is not installed, and CI runs the real control-plane tests too: install Go 1.26" >&2
  exit 1
else
  echo "tests/run.sh: Go is not installed: the tests on the real control plane are skipped (listed as ignored)." >&2
  echo "  Install Go 1.26 and run this again to build the control plane and include them." >&2
fi
exec cargo test --workspace "${cargo_args[@]}" -- "${harness_args[@]}"
