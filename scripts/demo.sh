#!/usr/bin/env bash
# Sets up and runs the main job: the engine on its embedded SQLite store in ./demo-data, an enrollment group
# created through the service API, and a demo device provisioned end to end with the device client.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --locked -p provision-demo -- "${1:-demo-data}" "${2:-demo-device-001}"
