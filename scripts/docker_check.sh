#!/usr/bin/env bash
# `make docker-check`: builds docker/Dockerfile with podman/buildah on a local Debian base and runs the image.
#
# No Docker engine and no image registry are needed: the base is made with debootstrap + `podman import`, torch
# comes from the local wheel directories when the machine has them (mounted read-only into the build), everything
# else from PyPI and deb.debian.org. Steps, each timed and reported at the end:
#   packages  podman, buildah, runc, debootstrap from Debian (installed only where missing)
#   base      Debian bookworm minbase as localhost/mixmo-base, with a uid-1000 user like Ubuntu 24.04's
#   build     docker/Dockerfile with BASE_IMAGE/TORCH_INDEX_URL build args (prints time, image size, disk used)
#   demo      the default command (demo recipe, synthetic data) as the image's user 1000; runs/ is a host directory
#             owned by uid 1000 (mode 0755, as a user's own directory); the host reads metrics and checkpoint
#   evaluate  python -m mixmo_dist.evaluate on that checkpoint, as uid 4321 (not in the image's passwd, like
#             `docker run --user "$(id -u):$(id -g)"`), runs/ read-only, the JSON into a directory owned by 4321
#   ddp       accelerate launch --multi_gpu --num_processes 2: a 2-rank gloo world in one container
# Everything lives in one work directory with its own podman storage; it is removed at the end (images, containers,
# rootfs) unless MIXMO_DOCKER_KEEP=1.
#
# Environment: MIXMO_DOCKER_KEEP=1 (keep the work directory, image and storage), MIXMO_DOCKER_DIR (work directory;
# default a new /var/tmp/mixmo-docker.XXXXXX; needs ~14 GB free: the build's peak is twice the image),
# MIXMO_DOCKER_DRIVER (podman storage driver, default overlay; vfs where overlay cannot mount, e.g. inside another
# container: it copies every layer),
# MIXMO_DEBIAN_MIRROR (default http://deb.debian.org/debian), MIXMO_DOCKER_TORCH_INDEX (the build's TORCH_INDEX_URL;
# default: an index of the files the host's pip picks for torch, else https://pypi.org/simple).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

KEEP=${MIXMO_DOCKER_KEEP:-0}
DRIVER=${MIXMO_DOCKER_DRIVER:-overlay}
MIRROR=${MIXMO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_TAG=localhost/mixmo-base:bookworm
IMAGE_TAG=localhost/mixmo_dist:check
USER_UID=1000 # the image's user (docker/Dockerfile)
OTHER_UID=4321 # a host user whose uid is not the image's
T0=$(date +%s)

die() {
  echo "docker-check: error: $*" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, rootful podman); run it as root or with sudo"
[ -f docker/Dockerfile ] || die "docker/Dockerfile not found in $REPO"

if [ -n "${MIXMO_DOCKER_DIR:-}" ]; then
  WORK=$MIXMO_DOCKER_DIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /var/tmp/mixmo-docker.XXXXXX)
fi
WORK=$(cd "$WORK" && pwd)
# Traversable like a user's own directory: the host-side checks read the outputs as uid 1000 and 4321, not as root.
chmod 0755 "$WORK"
STORE=$WORK/storage

# A private podman store (its own root and runroot): nothing touches the machine's default storage, and cleaning up
# is removing one directory. runc because crun fails on cgroup-v1 hosts like this one; the ulimits because the
# default (the host's, unlimited) is refused there.
pm() {
  podman --root "$STORE" --runroot "$WORK/runroot" --storage-driver "$DRIVER" --runtime runc \
    --cgroup-manager cgroupfs --events-backend file "$@"
}
RUN_OPTS=(--rm --network none --shm-size 1g --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

declare -a RESULTS
step_start=0
begin() {
  step_start=$(date +%s)
  echo
  echo "=== docker-check: $1 ==="
}
ok() { # ok NAME DETAIL
  local took=$(($(date +%s) - step_start))
  RESULTS+=("$(printf '%-9s ok    %5ss  %s' "$1" "$took" "$2")")
  echo "--- $1: ok (${took}s) $2"
}
fail_step() { # fail_step NAME DETAIL
  local took=$(($(date +%s) - step_start))
  RESULTS+=("$(printf '%-9s FAIL  %5ss  %s' "$1" "$took" "$2")")
  die "$1: $2"
}
gb() { awk -v b="$1" 'BEGIN { printf "%.2f GB", b / 1e9 }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }
# Runs a command with its output into a log and a filter of it onto the console; returns the command's status.
logged() { # logged LOG FILTER -- CMD...
  local log=$1 filter=$2 status
  shift 3
  set +e
  "$@" 2>&1 | tee "$log" | eval "$filter"
  status=${PIPESTATUS[0]}
  set -e
  return "$status"
}
du_bytes() { { du -sxb "$1" 2>/dev/null || true; } | tail -1 | cut -f1; }

sampler=""
cleanup() {
  local rc=$?
  [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
  echo
  echo "=== docker-check: summary ==="
  printf '%s\n' "${RESULTS[@]}"
  echo "total: $(($(date +%s) - T0))s"
  if [ "$KEEP" = 1 ]; then
    echo "kept (MIXMO_DOCKER_KEEP=1): $WORK"
    echo "  podman --root $STORE --runroot $WORK/runroot --storage-driver $DRIVER --runtime runc images"
    echo "  remove with: podman --root $STORE --runroot $WORK/runroot system reset -f; rm -rf $WORK"
  else
    pm rm -af >/dev/null 2>&1 || true
    pm system reset -f >/dev/null 2>&1 || true
    if findmnt -rno TARGET | grep -q "^$WORK"; then
      echo "docker-check: warning: mounts left under $WORK; not removing it" >&2
    else
      rm -rf "$WORK"
      echo "removed $WORK (images, containers, storage, base rootfs, run outputs)"
    fi
  fi
  [ "$rc" = 0 ] && echo "docker-check: PASSED" || echo "docker-check: FAILED (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT

# --- packages ---------------------------------------------------------------------------------------------------
begin packages
pkgs=(podman buildah runc debootstrap uidmap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
    || fail_step packages "apt-get install ${missing[*]} failed"
  ok packages "installed ${missing[*]}"
else
  ok packages "already installed: ${pkgs[*]}"
fi
echo "$(podman --version), $(buildah --version | cut -d' ' -f1-3), runc $(runc --version | head -1 | cut -d' ' -f3)," \
  "storage driver $DRIVER, work directory $WORK"

# --- base -------------------------------------------------------------------------------------------------------
begin base
ROOTFS=$WORK/rootfs
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log"; fail_step base "debootstrap bookworm from $MIRROR failed"; }
# What an official Debian image has: updates and security sources, no package caches.
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
# Ubuntu 24.04 images (the users' base) hold a user `ubuntu` with uid/gid 1000; so does this base, so that the
# Dockerfile's user step is exercised the way the users' build runs it.
chroot "$ROOTFS" useradd --create-home --uid 1000 --user-group --shell /bin/bash ubuntu
tar -C "$ROOTFS" -c . | pm import --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null \
  || fail_step base "podman import failed"
rm -rf "$ROOTFS" # the image holds it now
ok base "$BASE_TAG ($(mb "$(pm image inspect --format '{{.Size}}' "$BASE_TAG")"))"

# --- build ------------------------------------------------------------------------------------------------------
begin build
# pip inside the build sees this machine's wheel directories (read-only) the way the host's pip does; the image
# keeps nothing of them (build-time mounts, not layers).
mounts=()
mounted=""
add_mount() { # add_mount DIR: bind DIR read-only at the same path, unless it or a parent is already
  local m
  for m in $mounted; do
    case "$1/" in "$m"/*) return ;; esac
  done
  mounts+=(--volume "$1:$1:ro")
  mounted+="$1 "
}
find_links=()
extra_index=()
for d in /opt/wheels /opt/pypi /opt/pypi-more; do
  [ -d "$d" ] || continue
  add_mount "$d"
  if [ -d "$d/simple" ]; then extra_index+=("file://$d/simple"); else find_links+=("$d"); fi
done

# Writes into $1 a PEP 503 index that lists, for torch, torchvision and each of their dependencies, the one file this
# machine's pip picks for the Dockerfile's pins (`pip install --dry-run --report`), and mounts the local directories
# its file:// links point into. Fails where the host's pip cannot do it for the base's Python (3.11).
torch_index_from_host_pip() {
  local out=$1 torch torchvision listing
  torch=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)
  torchvision=$(sed -n 's/^ARG TORCHVISION_VERSION=//p' docker/Dockerfile)
  [ "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = 3.11 ] || return 1
  python3 -m pip install --dry-run --ignore-installed --quiet --report "$WORK/torch-report.json" \
    "torch==$torch" "torchvision==$torchvision" >"$WORK/torch-report.log" 2>&1 || return 1
  listing=$(python3 - "$WORK/torch-report.json" "$out" <<'PY'
import html, json, os, re, sys

report, out = sys.argv[1:3]
items = json.load(open(report))["install"]
dirs, local = set(), 0
for item in items:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    info = item["download_info"]
    url, archive = info["url"], info.get("archive_info")
    if archive is None:
        sys.exit(f"{name}: {url} is not an archive")
    hashes = dict(archive.get("hashes") or {})
    if not hashes and "hash" in archive:
        algo, _, value = archive["hash"].partition("=")
        hashes[algo] = value
    href = url + (f"#sha256={hashes['sha256']}" if "sha256" in hashes else "")
    if url.startswith("file://"):
        local += 1
        dirs.add(os.path.dirname(url[len("file://") :]))
    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, name, "index.html"), "w") as f:
        f.write(f'<html><body><a href="{html.escape(href)}">{html.escape(url.rsplit("/", 1)[-1])}</a></body></html>\n')
print(f"{len(items)} {local}", *sorted(dirs))
PY
  ) || return 1
  # shellcheck disable=SC2086 # the listing is words: a count, a count, then directories without spaces
  set -- $listing
  echo "torch index from the host's pip: $1 files, $2 of them local"
  shift 2
  for d in "$@"; do add_mount "$d"; done
}

# torch's layer gets that index when possible, so that the build takes torch from the local wheel directories as the
# host's pip does: offered the same wheel by PyPI and by a local index, the base's pip (23.0) takes PyPI's copy and
# downloads ~3 GB. Otherwise torch comes from PyPI, whose Linux wheels are the same CUDA build.
if [ -n "${MIXMO_DOCKER_TORCH_INDEX:-}" ]; then
  torch_index=$MIXMO_DOCKER_TORCH_INDEX
  # --index-url replaces pip's default index, not the extras: an index given by hand may lack torch's dependencies.
  [ "$torch_index" = https://pypi.org/simple ] || extra_index+=(https://pypi.org/simple)
elif torch_index_from_host_pip "$WORK/torch-index"; then
  add_mount "$WORK/torch-index"
  torch_index=file://$WORK/torch-index
else
  echo "the host's pip could not resolve torch for Python 3.11 (see $WORK/torch-report.log): torch from PyPI"
  torch_index=https://pypi.org/simple
fi
# The host's CA bundle too: where HTTPS goes through an intercepting proxy (as here), the base's own CA list fails.
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$host_ca" ] && mounts+=(--volume "$host_ca:/etc/pip-host-ca.crt:ro")
{
  echo "[global]"
  [ -f "$host_ca" ] && echo "cert = /etc/pip-host-ca.crt"
  [ ${#find_links[@]} -eq 0 ] || echo "find-links = ${find_links[*]}"
  [ ${#extra_index[@]} -eq 0 ] || echo "extra-index-url = ${extra_index[*]}"
} >"$WORK/pip.conf"
mounts+=(--volume "$WORK/pip.conf:/etc/pip.conf:ro")
echo "pip.conf for the build:"
sed 's/^/  /' "$WORK/pip.conf"
echo "TORCH_INDEX_URL=$torch_index"
build_t0=$(date +%s)
# The disk the build needs is its peak, not what is left after it (a layer is written next to the container's changes
# before those are dropped): sample the store's size while it runs.
echo 0 >"$WORK/peak_bytes"
(
  peak=0
  while sleep 10; do
    now=$(du_bytes "$STORE")
    if [ "${now:-0}" -gt "$peak" ]; then
      peak=$now
      echo "$peak" >"$WORK/peak_bytes"
    fi
  done
) &
sampler=$!
# chroot isolation: the RUN steps need no OCI runtime (crun/runc containers cannot be nested in a build here).
logged "$WORK/build.log" "grep --line-buffered -E '^(STEP|COMMIT|Successfully|ERROR|Error)' | cut -c1-150" -- \
  pm build --isolation chroot --pull=never --format docker -f docker/Dockerfile -t "$IMAGE_TAG" \
  --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg "TORCH_INDEX_URL=$torch_index" "${mounts[@]}" . \
  || { tail -30 "$WORK/build.log"; fail_step build "podman build failed (log above)"; }
build_s=$(($(date +%s) - build_t0))
kill "$sampler" 2>/dev/null || true
sampler=""
size=$(pm image inspect --format '{{.Size}}' "$IMAGE_TAG")
disk=$(du_bytes "$STORE")
peak=$(cat "$WORK/peak_bytes")
[ "$disk" -gt "$peak" ] && peak=$disk
ok build "in ${build_s}s; image $(gb "$size"); podman storage $(gb "$disk") after the build, $(gb "$peak") at its peak"
echo "torch came from: $(grep -m1 -oE '(Processing|Downloading) [^ ]*torch-[0-9][^ ]*' "$WORK/build.log" || echo '?')"

# --- demo: the default command as the image's user --------------------------------------------------------------
begin demo
RUNS=$WORK/runs
mkdir -p "$RUNS"
chown "$USER_UID:$USER_UID" "$RUNS"
chmod 0755 "$RUNS"
logged "$WORK/demo.log" "tail -15" -- pm run "${RUN_OPTS[@]}" -v "$RUNS:/workspace/runs" "$IMAGE_TAG" \
  || fail_step demo "the default command failed (log above)"
# As the host user who owns runs/ (uid 1000, no root privileges): the files are theirs and readable.
as_user() { setpriv --reuid "$1" --regid "$1" --clear-groups -- "${@:2}"; }
metrics=$RUNS/demo/metrics.jsonl
latest=$(as_user "$USER_UID" cat "$RUNS/demo/checkpoints/latest") \
  || fail_step demo "no checkpoints/latest in $RUNS/demo"
ckpt=$RUNS/demo/checkpoints/$latest
as_user "$USER_UID" test -s "$ckpt/model.safetensors" -a -f "$ckpt/COMPLETE" \
  || fail_step demo "checkpoint $ckpt incomplete or unreadable by uid $USER_UID"
last_val=$(as_user "$USER_UID" grep '"split": *"val"' "$metrics" | tail -1) \
  || fail_step demo "no val row in $metrics (unreadable by uid $USER_UID?)"
foreign=$(find "$RUNS" ! -uid "$USER_UID" | head -3)
[ -z "$foreign" ] || fail_step demo "files not owned by uid $USER_UID: $foreign"
world_writable=$(find "$RUNS" -perm -o+w ! -type l | head -3)
[ -z "$world_writable" ] || fail_step demo "world-writable: $world_writable"
echo "final metrics line: $last_val"
ok demo "trained to $latest; host uid $USER_UID reads metrics.jsonl and the checkpoint; all files owned by it"

# --- evaluate: as a uid the image does not know ----------------------------------------------------------------
begin evaluate
EVAL=$WORK/eval
mkdir -p "$EVAL"
chown "$OTHER_UID:$OTHER_UID" "$EVAL"
chmod 0755 "$EVAL"
pm run "${RUN_OPTS[@]}" --user "$OTHER_UID:$OTHER_UID" -e HOME=/tmp -v "$RUNS:/workspace/runs:ro" \
  -v "$EVAL:/workspace/eval" --entrypoint python "$IMAGE_TAG" \
  -m mixmo_dist.evaluate --checkpoint runs/demo --out eval/demo.json \
  >"$WORK/eval.json" 2>"$WORK/eval.log" || { tail -20 "$WORK/eval.log"; fail_step evaluate "evaluate failed"; }
as_user "$OTHER_UID" cat "$EVAL/demo.json" >/dev/null \
  || fail_step evaluate "eval/demo.json unreadable by uid $OTHER_UID"
[ "$(stat -c %u "$EVAL/demo.json")" = "$OTHER_UID" ] \
  || fail_step evaluate "eval/demo.json is not owned by uid $OTHER_UID"
summary=$(python3 - "$WORK/eval.json" "$last_val" <<'EOF'
import json, sys
ev = json.load(open(sys.argv[1]))
val = json.loads(sys.argv[2])
# The same checkpoint on the same synthetic validation set: the trainer's last val row and evaluate agree.
assert ev["steps"] == [val["step"]], (ev["steps"], val["step"])
assert abs(ev["top1"] - val["top1"]) < 1e-9, (ev["top1"], val["top1"])
print(json.dumps({k: ev[k] for k in ev if not isinstance(ev[k], (dict, list))}))
EOF
) || fail_step evaluate "evaluate's JSON does not match the demo's last val row (see above)"
echo "evaluate JSON (scalars): $summary"
ok evaluate "as uid $OTHER_UID: top1 equals the demo's last val row; eval/demo.json owned by $OTHER_UID"

# --- ddp: two processes in one container ------------------------------------------------------------------------
begin ddp
logged "$WORK/ddp.log" "tail -12" -- pm run "${RUN_OPTS[@]}" -v "$RUNS:/workspace/runs" "$IMAGE_TAG" \
  --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m mixmo_dist.train --config configs/demo.yaml --data.backend=synthetic --run.output_dir=runs/ddp \
  --schedule.epochs=1 --schedule.warmup_epochs=0.5 || fail_step ddp "the 2-process run failed (log above)"
world=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["world_size"])' "$RUNS/ddp/run.json")
[ "$world" = 2 ] || fail_step ddp "run.json says world_size=$world, expected 2"
latest=$(cat "$RUNS/ddp/checkpoints/latest")
ranks=$(find "$RUNS/ddp/checkpoints/$latest" -name 'rank_*.json' | wc -l)
[ "$ranks" = 2 ] || fail_step ddp "$latest holds $ranks rank files, expected 2"
echo "final metrics line: $(grep '"split": *"val"' "$RUNS/ddp/metrics.jsonl" | tail -1)"
ok ddp "world_size 2 (gloo), $latest with rank_0.json and rank_1.json"

disk_end=$(du_bytes "$WORK")
echo "work directory at the end: $(gb "$disk_end")"
