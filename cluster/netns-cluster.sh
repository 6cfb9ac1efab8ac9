#!/usr/bin/env bash
# A local multi-host cluster for tests: hosts in network namespaces on one bridge, reached by mpirun
# through netns-agent.sh instead of ssh, so that ranks on different "hosts" talk over real TCP.
#
#   cluster/netns-cluster.sh up 2        # hosts cvnode1, cvnode2 at 10.77.0.1, 10.77.0.2; bridge 10.77.0.254
#   cluster/netns-cluster.sh run 2 -- convirt info            # 2 ranks, one per host, TCP only
#   CONVIRT_CLUSTER_SLOTS=2 cluster/netns-cluster.sh run 2 -- convirt info   # 4 ranks, 2 per host (0 and 2 on
#                                                             # the first, 1 and 3 on the second)
#   cluster/netns-cluster.sh down 2
#
# Needs root (ip netns); the addresses are private to this machine's own namespaces.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
action="${1:-}"; count="${2:-2}"
bridge=cvbr0 subnet=10.77.0

up() {
  ip link show "$bridge" >/dev/null 2>&1 || { ip link add "$bridge" type bridge; ip addr add "$subnet.254/24" dev "$bridge"; ip link set "$bridge" up; }
  for i in $(seq 1 "$count"); do
    ns="cvnode$i"
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip link add "cvveth$i" type veth peer name eth0 netns "$ns"
    ip link set "cvveth$i" master "$bridge" up
    ip netns exec "$ns" ip addr add "$subnet.$i/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
  done
}

down() {
  for i in $(seq 1 "$count"); do
    ip netns del "cvnode$i" 2>/dev/null || true
    ip link del "cvveth$i" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
}

run() {
  shift 2
  [ "${1:-}" = "--" ] && shift
  local hosts="" slots="${CONVIRT_CLUSTER_SLOTS:-1}"
  for i in $(seq 1 "$count"); do hosts="$hosts${hosts:+,}$subnet.$i:$slots"; done
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # CONVIRT_CLUSTER_TIMEOUT=S bounds the whole job (exit status 124 when it was cut off).
  local limit=()
  if [ -n "${CONVIRT_CLUSTER_TIMEOUT:-}" ]; then limit=(timeout --kill-after=5 "$CONVIRT_CLUSTER_TIMEOUT"); fi
  # rtc_hwloc_vmhole none: every orted of a job that shares one machine otherwise maps hwloc's topology
  # into shared memory at the same address, and about one start in six one of them crashed there
  # (hwloc_shmem_topology_write, SIGSEGV) while daemonized, so that mpirun waited for it forever. Real
  # clusters run one orted per machine and never race; 0 stalls in 100 starts with it, 4 in 20 without.
  exec "${limit[@]}" mpirun --host "$hosts" -np "$((count * slots))" --map-by node \
    --mca plm_rsh_agent "$here/netns-agent.sh" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include "$subnet.0/24" --mca btl tcp,self --mca btl_tcp_if_include "$subnet.0/24" \
    --mca rtc_hwloc_vmhole none \
    -x OPENBLAS_NUM_THREADS=1 "$@"
}

case "$action" in
  up) up ;;
  down) down ;;
  run) run "$@" ;;
  *) echo "usage: $0 up|down N | run N -- COMMAND..." >&2; exit 2 ;;
esac
