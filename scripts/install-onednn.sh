#!/usr/bin/env bash
# Puts oneDNN 3 (the v3 API convirt is written to) where the build finds it: .deps/onednn, with
# include/ and lib/ (libdnnl.so.3), found by Package.swift and by the binaries (an rpath).
#   - DNNL_ROOT=/path (a site's module, Spack or oneAPI install of oneDNN 3.x with include/ and lib/):
#     .deps/onednn links to it;
#   - else a oneDNN 3.x that pkg-config finds (dnnl.pc), linked likewise;
#     either must be built for GNU OpenMP (its libdnnl.so.3 depends on libgomp), whose threads convirt
#     shares with it: another runtime is refused under DNNL_ROOT and passed over from pkg-config;
#   - else the vendor's own CPU build for GNU OpenMP, from PyPI (onednn-cpu-gomp and
#     onednn-devel-cpu-gomp 2023.2.0: oneDNN 3.2.0, libdnnl.so.3 depending on libgomp only), checked
#     against pinned SHA-256 sums and unpacked into .deps/onednn. No Python runs it at run time.
# .deps/onednn/ORIGIN says which (`convirt info` prints it). No-op when it is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=.deps/onednn
include="" lib="" origin=""
if [ -n "${DNNL_ROOT:-}" ]; then
  include="$DNNL_ROOT/include"
  for dir in "$DNNL_ROOT/lib" "$DNNL_ROOT/lib64" "$DNNL_ROOT"/lib/*-linux-gnu; do
    if [ -f "$dir/libdnnl.so.3" ]; then lib="$dir"; break; fi
  done
  origin="oneDNN at $DNNL_ROOT (DNNL_ROOT)"
elif command -v pkg-config >/dev/null && pkg-config --exists 'dnnl >= 3' 2>/dev/null; then
  include=$(pkg-config --variable=includedir dnnl)
  lib=$(pkg-config --variable=libdir dnnl)
  origin="oneDNN $(pkg-config --modversion dnnl) at $(pkg-config --variable=prefix dnnl) (pkg-config dnnl)"
fi
if [ -n "$origin" ]; then
  if [ ! -f "$include/oneapi/dnnl/dnnl.h" ] || [ ! -f "$lib/libdnnl.so.3" ]; then
    echo "$origin: no include/oneapi/dnnl/dnnl.h and lib/libdnnl.so.3 (oneDNN 3.x) there" >&2
    exit 1
  fi
  # convirt runs its own loops on the OpenMP team that runs oneDNN's primitives: it needs a oneDNN built
  # for GNU OpenMP (its library depends on libgomp). oneAPI's default build runs on SYCL and finds no CPU
  # engine without a SYCL CPU device; an Intel or LLVM OpenMP build would bring a second OpenMP runtime.
  needed=" $(ldd "$lib/libdnnl.so.3" 2>/dev/null | awk '{print $1}' | tr '\n' ' ') "
  if [[ "$needed" != *" libgomp.so.1 "* ]]; then
    case "$needed" in
      *" libsycl.so"*) runtime="SYCL (it depends on libsycl)" ;;
      *" libiomp5.so "*) runtime="Intel OpenMP (libiomp5)" ;;
      *" libomp.so"*) runtime="LLVM OpenMP (libomp)" ;;
      *" libtbb.so"*) runtime="TBB" ;;
      *) runtime="no OpenMP (none among its dependencies)" ;;
    esac
    problem="$lib/libdnnl.so.3 runs its CPU kernels on $runtime, not on GNU OpenMP (libgomp), whose threads convirt shares with it"
    if [ -n "${DNNL_ROOT:-}" ]; then
      echo "$origin: $problem. Give DNNL_ROOT a oneDNN 3 built for GNU OpenMP (oneAPI: its cpu_gomp configuration;" \
        "Spack: onednn cpu_runtime=omp built with GCC), or unset it to install Intel's CPU build for GNU OpenMP from PyPI." >&2
      exit 1
    fi
    echo "note: $origin: $problem; installing Intel's CPU build for GNU OpenMP from PyPI instead"
    origin=""
  fi
fi
if [ -n "$origin" ]; then
  if [ "$(cat "$prefix/ORIGIN" 2>/dev/null)" = "$origin" ]; then exit 0; fi
  rm -rf "$prefix" && mkdir -p "$prefix"
  ln -s "$include" "$prefix/include"
  ln -s "$lib" "$prefix/lib"
  echo "$origin" > "$prefix/ORIGIN"
  echo "oneDNN: $origin"
  exit 0
fi
version=2023.2.0
origin="PyPI onednn-cpu-gomp $version (oneDNN 3.2.0, Intel's CPU build for GNU OpenMP)"
if [ "$(cat "$prefix/ORIGIN" 2>/dev/null)" = "$origin" ] && [ -f "$prefix/lib/libdnnl.so.3" ]; then exit 0; fi
wheels=(
  "onednn_cpu_gomp-$version-py2.py3-none-manylinux1_x86_64.whl 2f22a54d6a890ed14bfa185d42a4be65d8b5b1df85dc1f0f3a9abe31620416fb"
  "onednn_devel_cpu_gomp-$version-py2.py3-none-manylinux1_x86_64.whl 9763c69e8c907e119056bd52ad918ca84ac9ba939d130a99dfa95ccca3e5e284"
)
echo "installing oneDNN 3.2.0 (PyPI onednn-cpu-gomp $version) into $prefix"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/pip.log"
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" \
    "onednn-cpu-gomp==$version" "onednn-devel-cpu-gomp==$version" >"$log" 2>&1; then
  echo "pip could not download onednn-cpu-gomp $version; its output:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
for entry in "${wheels[@]}"; do
  set -- $entry
  echo "$2  $work/$1" | sha256sum --check --quiet || { echo "$1: SHA-256 differs from the pinned sum" >&2; exit 1; }
  python3 -m zipfile -e "$work/$1" "$work/unpacked"
done
rm -rf "$prefix" && mkdir -p "$prefix/lib"
data="$work/unpacked/onednn_devel_cpu_gomp-$version.data/data"
cp -r "$data/include" "$prefix/include"
# The wheel holds three copies of the library (zip has no links): one file and two links.
mv "$work/unpacked/onednn_cpu_gomp-$version.data/data/lib/libdnnl.so.3.2" "$prefix/lib/libdnnl.so.3"
ln -s libdnnl.so.3 "$prefix/lib/libdnnl.so"
cp "$work/unpacked/onednn_cpu_gomp-$version.dist-info/LICENSE.txt" "$prefix/LICENSE.txt"
echo "$origin" > "$prefix/ORIGIN"
echo "  oneDNN 3.2.0 in $prefix ($(du -sh "$prefix" | cut -f1))"
