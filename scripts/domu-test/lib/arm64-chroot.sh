# Arm64 pieces shared by scripts/build-arm64 and the harness's `arm64` group (sourced
# after common.sh, bash):
#  * a private apt configuration for Debian trixie arm64 (packages are downloaded and
#    unpacked with dpkg-deb; the host's apt/dpkg state is never touched);
#  * a Debian trixie amd64 chroot with rustc/cargo 1.85 + the aarch64 std
#    (libstd-rust-dev:arm64) + the aarch64 cross gcc, and kbuild + headers of the arm64
#    kernel (out-of-tree modules). Cached in $CACHE/arm64-chroot-<hash> (hash of the package
#    list, their versions, the mirror and the text of _build_arm64_chroot). It is also the project's MSRV gate:
#    rustc 1.85 = rust-version in Cargo.toml.
# Every mount made here (proc, /dev, the checkout) lives in a private mount namespace and is
# undone before the function returns.

ARM64_SUITE=trixie
ARM64_APT=$CACHE/arm64-apt
ARM64_RUST_PACKAGES="rustc cargo libstd-rust-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
ARM64_TARGET=aarch64-unknown-linux-gnu

arm64_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    apt-cache policy | awk '$3 == "bookworm/main" && $4 == "amd64" {print $2; exit}'
}

# apt-get/apt-cache with the private trixie arm64 configuration.
arm64_apt() { APT_CONFIG=$ARM64_APT/apt.conf "$@"; }

# Create the private apt configuration and update its lists once per host boot (one
# process at a time: builds run concurrently, lib/prebuild.py).
arm64_apt_updated() { mkdir -p "$ARM64_APT"; locked "$ARM64_APT/.lock" _arm64_apt_updated; }
_arm64_apt_updated() {
    private_apt_updated "$ARM64_APT" arm64 "$ARM64_SUITE" "$(arm64_mirror)"
}

arm64_version() { arm64_apt apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }

# Download arm64 (or arch: all) packages into $CACHE/debs-arm64 once; print their paths,
# one a line, in order (one apt-cache call for all: it is slow on a busy machine). Under
# $CACHE/debs-arm64/.lock: a half-written .deb is never seen.
arm64_fetch() { mkdir -p "$CACHE/debs-arm64"; locked "$CACHE/debs-arm64/.lock" _arm64_fetch "$@"; }
_arm64_fetch() {
    local name ver deb
    arm64_apt apt-cache policy "$@" | awk '/^[^ ]/ {sub(":$", ""); p=$1} /Candidate:/ {print p, $2}' \
        > "$CACHE/debs-arm64/.policy.$$"
    for name in "$@"; do
        ver=$(awk -v p="$name" '$1 == p {print $2; exit}' "$CACHE/debs-arm64/.policy.$$")
        [[ -n $ver && $ver != "(none)" ]] || { rm -f "$CACHE/debs-arm64/.policy.$$"; die "no version of $name in the $ARM64_SUITE arm64 lists"; }
        deb=$(ls "$CACHE"/debs-arm64/"${name}_${ver//:/%3a}"_*.deb 2>/dev/null | head -n1 || true)
        if [[ -z $deb ]]; then
            (cd "$CACHE/debs-arm64" && arm64_apt apt-get download -q "$name=$ver" >/dev/null 2>&1) \
                || { rm -f "$CACHE/debs-arm64/.policy.$$"; die "apt-get download $name=$ver ($ARM64_SUITE arm64) failed"; }
            deb=$(ls "$CACHE"/debs-arm64/"${name}_${ver//:/%3a}"_*.deb | head -n1)
        fi
        printf '%s\n' "$deb"
    done
    rm -f "$CACHE/debs-arm64/.policy.$$"
}

# The kernel ABI Debian's linux-image-arm64 points at, e.g. 6.12.57+deb13 (sets ARM64_KV).
arm64_kernel_abi() {
    local pkg
    pkg=$(arm64_apt apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-6/ {print $2; exit}')
    [[ -n $pkg ]] || die "cannot resolve linux-image-arm64 in the $ARM64_SUITE arm64 lists"
    pkg=${pkg#linux-image-}
    ARM64_KV=${pkg%-arm64}
}

_build_arm64_chroot() { # $1 = output dir; uses ARM64_KV, ARM64_CHROOT_PACKAGES
    local out=$1 root=$1/root mirror hdr
    mirror=$(arm64_mirror)
    log "debootstrap $ARM64_SUITE (amd64 chroot for the aarch64 cross build; ~1-2 min)"
    # In a mount namespace of its own: whatever debootstrap mounts in the target goes away
    # with it, even if it is killed.
    unshare --mount --propagation private \
        debootstrap --variant=minbase --include=ca-certificates "$ARM64_SUITE" "$root" "$mirror" \
        > "$out/debootstrap.log" 2>&1 || { tail -20 "$out/debootstrap.log" >&2; return 1; }
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" dpkg --add-architecture arm64
    log "apt-get install in the chroot: $ARM64_CHROOT_PACKAGES"
    ARM64_ROOT=$root arm64_chroot_run "$out" /mnt/build sh -c "apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $ARM64_CHROOT_PACKAGES" \
        > "$out/apt.log" 2>&1 || { tail -20 "$out/apt.log" >&2; return 1; }
    # linux-headers-<abi>-arm64 is arch arm64 (and depends on gcc-14:arm64, not
    # co-installable): unpack it; its scripts/ link to the amd64 linux-kbuild package.
    hdr=$(arm64_fetch "linux-headers-$ARM64_KV-arm64")
    dpkg-deb -x "$hdr" "$root"
    [[ -e $root/usr/src/linux-headers-$ARM64_KV-arm64/Makefile ]] || { log "arm64 headers missing"; return 1; }
    chroot "$root" rustc --version > "$out/rustc-version"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,locale}
    du -sh "$root" | awk '{print "arm64 chroot: " $1}' >&2
}

# Sets ARM64_ROOT (the chroot), ARM64_KV.
prepare_arm64_chroot() {
    command -v debootstrap >/dev/null || ensure_host_tools
    arm64_apt_updated
    arm64_kernel_abi
    ARM64_CHROOT_PACKAGES="$ARM64_RUST_PACKAGES make bc kmod linux-kbuild-$ARM64_KV linux-headers-$ARM64_KV-common"
    local dir=$CACHE/arm64-chroot-$(content_hash "$ARM64_SUITE" "$ARM64_CHROOT_PACKAGES" "$(arm64_mirror)" \
        "$(arm64_version rustc) $(arm64_version libstd-rust-dev) $(arm64_version linux-headers-$ARM64_KV-arm64)" \
        "$(declare -f _build_arm64_chroot)")   # the builder's text, not this whole file
    [[ -e $dir/.done ]] || log "building the arm64 chroot (not cached: ~3-4 min)"
    build_once "$dir" _build_arm64_chroot
    ARM64_ROOT=$dir/root
    export ARM64_ROOT ARM64_KV
}

# arm64_chroot_run HOST_DIR MOUNTPOINT CMD...: run CMD in the chroot (niced) with /proc,
# /dev and HOST_DIR (at MOUNTPOINT inside) mounted, the host's CA bundle (crates are
# fetched through this workplace's TLS proxy) and resolv.conf. The mounts live in a mount
# namespace of this command only (unshare): concurrent runs do not stack mounts on each
# other, nothing shows on the host, and they are unmounted at the end (explicitly, and by
# the namespace going away even if the command is killed).
arm64_chroot_run() {
    local src=$1 mnt=$2; shift 2
    cp /etc/resolv.conf "$ARM64_ROOT/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$ARM64_ROOT/etc/ssl/host-ca.crt"
    mkdir -p "$ARM64_ROOT/$mnt"
    local rc=0
    unshare --mount --propagation private /bin/bash -euc '
        root=$1 src=$2 mnt=$3; shift 3
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev"   # not --rbind: one mount, one umount
        mount --bind "$src" "$root/$mnt"
        rc=0
        nice -n 10 chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            CARGO_HOME=/var/cache/cargo-home CARGO_HTTP_CAINFO=/etc/ssl/host-ca.crt \
            SSL_CERT_FILE=/etc/ssl/host-ca.crt "$@" || rc=$?
        umount "$root/$mnt" "$root/dev" "$root/proc" || true
        exit $rc' arm64-chroot "$ARM64_ROOT" "$src" "$mnt" "$@" || rc=$?
    rmdir "$ARM64_ROOT/$mnt" 2>/dev/null || true
    return $rc
}

# arm64_build_bins REPO BIN...: static, release aarch64 builds of the named binaries into
# REPO/target/aarch64-unknown-linux-gnu/release/ (rustc 1.85, Cargo.lock as committed),
# and stripped copies in .../release/stripped/ (what the arm64 VMs get).
arm64_build_bins() {
    local repo=$1 mnt=/mnt/src-$$ bins="" strip="" b rel; shift
    rel=target/$ARM64_TARGET/release
    for b in "$@"; do
        bins="$bins --bin $b"
        strip="$strip && aarch64-linux-gnu-strip -o $rel/stripped/$b $rel/$b"
    done
    arm64_chroot_run "$repo" "$mnt" sh -c "cd $mnt && rustc --version && \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --release --locked --target $ARM64_TARGET $bins && mkdir -p $rel/stripped $strip"
}
