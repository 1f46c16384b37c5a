# Xen pieces (sourced by build.sh after common.sh/kernel.sh/initramfs.sh):
# the Dom0 root filesystem (debootstrap bookworm minbase + Xen tools + hypervisor + the
# kernel modules Dom0 needs), packed with `mkfs.ext4 -d` (no loop mount), and the Xen
# hypervisor binary taken from that same rootfs (so it always matches the tools' version).
# Sets XEN_BIN, DOM0_IMG, XEN_VERSION.

DOM0_PACKAGES=xen-utils-4.17,xen-hypervisor-4.17-amd64,xenstore-utils,kmod,udev,procps,iproute2,busybox,pciutils
# Modules Dom0 loads (closure from modules.dep is copied into the rootfs). virtio-gpu:
# the two-head card of xen-noisy-neighbour (loaded by that scenario only).
DOM0_MODULES="xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd bochs virtio-gpu virtio_blk ext4 crc32c_generic"
DOM0_IMG_SIZE=1200M

# The bookworm mirror the host's apt uses (override: DEBIAN_MIRROR).
debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    apt-cache policy | awk '$3 == "bookworm/main" && $4 == "amd64" {print $2; exit}'
}

# "pkg=version ..." as debootstrap will see them (bookworm main, not -security/-updates).
main_versions() {
    local p
    for p in "$@"; do
        printf '%s=%s ' "$p" "$(apt-cache madison "$p" | awk -F' *[|] *' '$3 ~ / bookworm\/main / {print $2; exit}')"
    done
}

_build_dom0() { # $1 = output dir
    local out=$1 root=$1/root m mirror
    mirror=$(debian_mirror); [[ -n $mirror ]] || die "cannot find a bookworm mirror in apt's sources"
    log "debootstrap bookworm from $mirror (takes ~70-90 s)"
    debootstrap --variant=minbase --include="$DOM0_PACKAGES" bookworm "$root" "$mirror" \
        > "$out/debootstrap.log" 2>&1 || { tail -20 "$out/debootstrap.log" >&2; return 1; }
    # Kernel modules Dom0 needs, then depmod inside the tree.
    python3 "$LIB_DIR/modclosure.py" "$KDIR/lib/modules/$KVER" $DOM0_MODULES > "$out/modules"
    while read -r m; do
        install -D -m644 "$KDIR/lib/modules/$KVER/$m" "$root/lib/modules/$KVER/$m"
    done < "$out/modules"
    cp "$KDIR"/lib/modules/"$KVER"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$KVER/"
    depmod -b "$root" "$KVER"
    # DomU kernel (uncompressed: libxc decompresses XZ slowly under TCG).
    cp "$VMLINUX" "$root/boot/vmlinux-$KVER"
    ln -sf "vmlinux-$KVER" "$root/boot/vmlinux"
    zcat "$root"/boot/xen-4.17-amd64.gz > "$out/xen"
    chroot "$root" dpkg-query -W -f='${Version}' xen-utils-4.17 > "$out/xen-version"
    # Slim down: docs, man pages, apt lists.
    rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    mkdir -p "$root/harness"
    log "mkfs.ext4 -d (Dom0 image $DOM0_IMG_SIZE)"
    mkfs.ext4 -q -F -L dom0 -d "$root" "$out/dom0.img" "$DOM0_IMG_SIZE"
    du -sh "$root" | awk '{print "dom0 tree: " $1}' >&2
    rm -rf "$root"
}

prepare_xen() {
    local dir=$CACHE/dom0-$(content_hash "$KDIR" "$DOM0_PACKAGES" "$DOM0_MODULES" "$DOM0_IMG_SIZE" \
        "$(debian_mirror)" "$(main_versions ${DOM0_PACKAGES//,/ })" "$LIB_DIR/xen.sh" "$LIB_DIR/modclosure.py")
    build_once "$dir" _build_dom0
    XEN_BIN=$dir/xen
    DOM0_IMG=$dir/dom0.img
    XEN_VERSION=$(cat "$dir/xen-version")
    export XEN_BIN DOM0_IMG XEN_VERSION
}
