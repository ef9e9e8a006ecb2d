#!/usr/bin/env bash
# Installs the Debian packages the lab needs (PostgreSQL 15, etcd, a venv-capable
# Python, iproute2 and nftables for the netns lab) and every baseline the benchmarks
# name (rclone, restic, pgBackRest; pg_receivewal comes with PostgreSQL). As root it
# runs apt-get; otherwise it names the command to run.
set -euo pipefail

need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v runuser >/dev/null || need+=(util-linux)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v chromium >/dev/null || need+=(chromium)  # headless rendering of HTML reports
command -v rclone >/dev/null || need+=(rclone)  # baseline of benchmarks/objects.py
command -v restic >/dev/null || need+=(restic)  # baseline of benchmarks/artifacts.py
command -v pgbackrest >/dev/null || need+=(pgbackrest)  # baseline of benchmarks/rpo_postgres.py
[ -x /usr/sbin/named ] || need+=(bind9)  # the lab's DNS server for the failover switch tests
command -v promtool >/dev/null || need+=(prometheus)  # alert-rule tests, Prometheus over the lab
[ -x /usr/sbin/ip ] || command -v ip >/dev/null || need+=(iproute2)  # the netns lab: namespaces, veth pairs, a bridge
[ -x /usr/sbin/nft ] || command -v nft >/dev/null || need+=(nftables)  # the netns lab: partitions are packet drops
command -v faketime >/dev/null || need+=(faketime)  # the chaos run's clock-skew fault (libfaketime)
command -v tc >/dev/null || [ -x /usr/sbin/tc ] || need+=(iproute2)  # the chaos run's slow link (tc tbf)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${need[*]}" >&2
    echo "run: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The postgresql package starts a default cluster; the lab runs its own.
if command -v pg_lsclusters >/dev/null && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
    systemctl stop postgresql 2>/dev/null || true
fi
# Debian starts etcd as a service on the default ports; the lab runs its own members.
systemctl disable --now etcd 2>/dev/null || true
# Debian starts BIND as a service on port 53; the lab runs its own named.
systemctl disable --now named 2>/dev/null || true
# Debian starts Prometheus as a service; the tests run their own.
systemctl disable --now prometheus 2>/dev/null || true
