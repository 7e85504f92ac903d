#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine:
# etcd 3.4 (server and etcdctl), protoc (etcd-client's build needs it), and
# ZooKeeper 3.8 (Debian's `zookeeper`: jars only, no service; the e2e harness
# starts its own standalone servers, see e2e/src/zk.rs; never `zookeeperd`,
# which would start a system service).
# etcd 3.5.1 for the version matrix comes from scripts/ensure-etcd35.sh.
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing ${missing[*]} ..."
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# ZooKeeper's jars (and default-jre, which it depends on). Its own line, without
# recommends: protoc above needs its recommended libprotobuf-dev, this does not.
if [ ! -f /usr/share/java/zookeeper.jar ]; then
  echo "Installing zookeeper ..."
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends zookeeper >/dev/null
fi
# A distribution etcd package may start a system service; our tests never use
# it (they start their own servers on free ports), so leave it alone.
etcd --version | awk "NR==1"
echo "zookeeper $(dpkg-query -W -f='${Version}' zookeeper)"
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
