# Shared helpers for the domu-test image builders (sourced, bash).
# Everything built here is cached OUTSIDE the checkout, keyed by content:
#   ${DISPLBACK_CACHE:-/var/cache/displback-domu-test}/<artifact>-<hash>/
set -euo pipefail

CACHE=${DISPLBACK_CACHE:-/var/cache/displback-domu-test}
LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$CACHE/debs"

log() { printf '[domu-test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A private apt configuration in DIR for SUITE/ARCH from MIRROR (the host's apt state is
# never touched); its lists are updated once per host boot (stamp in /run). Run it under
# `locked DIR/.lock`: builds run concurrently.
private_apt_updated() { # DIR ARCH SUITE MIRROR
    local d=$1 arch=$2 suite=$3 mirror=$4
    local stamp=/run/displback-domu-test.$(basename "$d")-updated
    [[ -e $stamp && -e $d/apt.conf ]] && return 0
    [[ -n $mirror ]] || die "cannot find a Debian mirror in apt's sources"
    mkdir -p "$d"/state/lists/partial "$d"/cache/archives/partial "$d"/etc/preferences.d
    touch "$d/state/status"
    echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
        > "$d/etc/sources.list"
    cat > "$d/apt.conf" <<EOC
Dir::State "$d/state"; Dir::State::status "$d/state/status"; Dir::Cache "$d/cache";
Dir::Etc::SourceList "$d/etc/sources.list"; Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "/nonexistent"; Dir::Etc::PreferencesParts "$d/etc/preferences.d";
APT::Architecture "$arch"; APT::Architectures { "$arch"; };
EOC
    log "apt-get update (private: $suite $arch)"
    APT_CONFIG=$d/apt.conf apt-get update -q >/dev/null || die "apt-get update ($suite $arch) failed"
    touch "$stamp"
}

# A program tree from a debtree spec (lib/debtree.py: the listed programs and their
# DT_NEEDED closure) as an UNCOMPRESSED cpio in OUT/weston.cpio (the kernel does not continue
# after a gzip member; see initramfs.sh), its stats and build time next to it. PREFIX (e.g.
# a private apt's wrapper) runs debtree.py.
build_tree_cpio() { # OUT SPEC LABEL [PREFIX...]
    local out=$1 spec=$2 label=$3 t0=$SECONDS; shift 3
    "$@" python3 "$LIB_DIR/debtree.py" "$spec" "$out/root" > "$out/stats" || return 1
    mkdir -p "$out/root/usr/share/fontconfig" "$out/root/var/cache/fontconfig"
    (cd "$out/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out/weston.cpio"
    du -sb "$out/root" | awk '{print "tree_bytes=" $1}' >> "$out/stats"
    rm -rf --one-file-system "$out/root" "$out/pool"
    echo $((SECONDS - t0)) > "$out/build-secs"
    log "$label tree: $(tr '\n' ' ' < "$out/stats") cpio=$(stat -c %s "$out/weston.cpio") in $((SECONDS - t0)) s"
}

# Several builders may run at once (the harness starts every image build of a run
# together, lib/prebuild.py; other checkouts share the cache): `locked FILE CMD...` runs CMD
# holding an exclusive flock on FILE (a shell function too; released when it returns or the
# process dies).
locked() {
    local lk_file=$1 lk rc=0; shift
    exec {lk}>>"$lk_file"
    flock "$lk"
    "$@" || rc=$?
    exec {lk}>&-
    return $rc
}
APT_LOCK=/run/displback-domu-test.apt.lock

# apt-get update once per boot of the host (apt-cache needs current lists).
apt_updated() { locked "$APT_LOCK" _apt_updated; }
_apt_updated() {
    local stamp=/run/displback-domu-test.apt-updated
    [[ -e $stamp ]] && return 0
    log "apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
    touch "$stamp"
}

# apt-get install the named packages (under the apt lock: dpkg allows one at a time).
apt_install() { apt_updated; locked "$APT_LOCK" _apt_install "$@"; }
_apt_install() {
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null \
        || die "apt-get install $* failed"
}

# Host tools the harness needs (installed only when missing).
ensure_host_tools() {
    local need=() pkg bin
    for pair in qemu-system-x86_64:qemu-system-x86 cpio:cpio xz:xz-utils mkfs.ext4:e2fsprogs \
                depmod:kmod debootstrap:debootstrap zstd:zstd strip:binutils; do
        bin=${pair%%:*}; pkg=${pair#*:}
        command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
    done
    # debootstrap needs these at run time
    [[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
    if ((${#need[@]})); then apt_install "${need[@]}"; fi
}

# Candidate version of a package in the host's apt lists.
pkg_version() {
    apt-cache policy "$1" | awk '/Candidate:/ {print $2}'
}

# The kernel package Debian's linux-image-amd64 currently points at, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg() {
    apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}'
}

# Download PKG[=VER] into $CACHE/debs (once) and print the .deb path. Under
# $CACHE/debs/.lock (debtree.py takes it too): a half-written .deb is never seen.
fetch_deb() { locked "$CACHE/debs/.lock" _fetch_deb "$@"; }
_fetch_deb() {
    local spec=$1 name=${1%%=*} ver deb
    if [[ $spec == *=* ]]; then ver=${spec#*=}; else ver=$(pkg_version "$name"); fi
    [[ -n $ver && $ver != "(none)" ]] || die "no version of $name in the apt lists"
    deb=$(ls "$CACHE"/debs/"${name}_${ver//:/%3a}"_*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        log "apt-get download $name=$ver"
        (cd "$CACHE/debs" && apt-get download -q "$name=$ver" >/dev/null 2>&1) || die "apt-get download $name=$ver failed"
        deb=$(ls "$CACHE"/debs/"${name}_${ver//:/%3a}"_*.deb | head -n1)
    fi
    printf '%s\n' "$deb"
}

# sha256 (first 16 hex digits) of its arguments' text and of the named files' contents.
content_hash() {
    local f
    {
        for f in "$@"; do
            # A file by its content only: a checkout elsewhere must hit the same cache.
            if [[ -f $f ]]; then sha256sum < "$f"; else printf '%s\n' "$f"; fi
        done
    } | sha256sum | cut -c1-16
}

# Build helper: run "$2..." to create directory $1 atomically (tmp dir, then rename).
# One builder at a time per directory ($1.lock); the others wait and reuse its result.
build_once() {
    [[ -e $1/.done ]] && return 0
    locked "$1.lock" _build_once "$@"
}
_build_once() {
    local dest=$1; shift
    [[ -e $dest/.done ]] && return 0
    # --one-file-system: never into a mount left inside (a chroot's /dev, /proc).
    rm -rf --one-file-system "$dest.tmp"; mkdir -p "$dest.tmp"
    "$@" "$dest.tmp" || { rm -rf --one-file-system "$dest.tmp"; die "building $(basename "$dest") failed"; }
    touch "$dest.tmp/.done"
    rm -rf --one-file-system "$dest"; mv "$dest.tmp" "$dest"
}
