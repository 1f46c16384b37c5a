# Debian bookworm kernel + busybox, unpacked into the cache (sourced after common.sh).
# Sets: KVER (e.g. 6.1.0-56-amd64), KDIR (unpacked tree: boot/, lib/modules/$KVER with
# modules.dep), VMLINUX (uncompressed ELF), BZIMAGE, BUSYBOX (static binary).

_build_kernel() { # $1 = output dir
    local deb=$KERNEL_DEB out=$1
    dpkg-deb -x "$deb" "$out"
    depmod -b "$out" "$KVER"
    python3 "$LIB_DIR/extract_vmlinux.py" "$out/boot/vmlinuz-$KVER" "$out/vmlinux"
}

_build_busybox() {
    dpkg-deb -x "$BUSYBOX_DEB" "$1"
}

prepare_kernel() {
    ensure_host_tools
    apt_updated
    local pkg; pkg=$(kernel_pkg)
    [[ -n $pkg ]] || die "cannot resolve linux-image-amd64's kernel package"
    KVER=${pkg#linux-image-}
    KERNEL_DEB=$(fetch_deb "$pkg")
    KDIR=$CACHE/kernel-$(content_hash "$KERNEL_DEB" "$LIB_DIR/kernel.sh" "$LIB_DIR/extract_vmlinux.py")
    build_once "$KDIR" _build_kernel
    VMLINUX=$KDIR/vmlinux
    BZIMAGE=$KDIR/boot/vmlinuz-$KVER
    BUSYBOX_DEB=$(fetch_deb busybox-static)
    local bdir=$CACHE/busybox-$(content_hash "$BUSYBOX_DEB")
    build_once "$bdir" _build_busybox
    BUSYBOX=$bdir/bin/busybox
    export KVER KDIR VMLINUX BZIMAGE BUSYBOX
}
