#!/usr/bin/env bash
# mpirun's remote agent for netns-cluster.sh: called as `netns-agent.sh [ssh options] HOST COMMAND...`,
# it runs COMMAND inside the network namespace of HOST (10.77.0.K -> cvnodeK) instead of over ssh.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
host="$1"; shift
ns="cvnode${host##*.}"
exec ip netns exec "$ns" /bin/sh -c "$*"
