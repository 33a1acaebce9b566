#!/usr/bin/env bash
# Runs the whole test suite as CI does: installs what the tests drive (RabbitMQ from
# Debian's packages, kubectl and helm into .tools/, minimal root filesystems from Debian's
# packages into .tools/rootfs/), starts the broker if it is down, then `cargo test`. Extra arguments go to cargo test (for example a test name).
# Works with CI=true and no stdin; installing RabbitMQ needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tools
bash tests/rootfs.sh
bash .ci/ensure-rabbitmq
export TESTRUNNER_KUBECTL="${TESTRUNNER_KUBECTL:-$PWD/.tools/kubectl/kubectl}"
exec cargo test "$@"
