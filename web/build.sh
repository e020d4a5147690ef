#!/bin/sh
# Rebuilds ember/server/static/ from web/src with the exact versions in package-lock.json.
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --ignore-scripts
node build.mjs
