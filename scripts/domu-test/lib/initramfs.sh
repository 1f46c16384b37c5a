# Initramfs pieces (sourced after common.sh and kernel.sh).
#
# A VM's initramfs = a small uncompressed "overlay" cpio built per run (init script,
# fresh Rust binaries) followed by the cached base (busybox + kernel modules, gzip).
# The overlay goes first: the kernel does not resume parsing after a gzip member.

_build_base_initramfs() { # $1 = output dir; uses BASE_MODULES
    local out=$1 root=$1/root m
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,mnt,lib/modules,etc}
    cp "$BUSYBOX" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    python3 "$LIB_DIR/modclosure.py" "$KDIR/lib/modules/$KVER" $BASE_MODULES > "$out/order"
    : > "$root/etc/modules.load"
    while read -r m; do
        [[ -n $m ]] || continue  # no modules at all (a kernel with everything built in)
        install -D -m644 "$KDIR/lib/modules/$KVER/$m" "$root/lib/modules/$(basename "$m")"
        echo "/lib/modules/$(basename "$m")" >> "$root/etc/modules.load"
    done < "$out/order"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 > "$out/base.cpio.gz"
    rm -rf "$root"
}

# build_base_initramfs NAME "mod1 mod2 ..." -> prints the path of the cached base.cpio.gz
build_base_initramfs() {
    local name=$1; BASE_MODULES=$2
    local dir=$CACHE/initramfs-$name-$(content_hash "$KDIR" "$BUSYBOX" "$BASE_MODULES" \
        "$LIB_DIR/initramfs.sh" "$LIB_DIR/modclosure.py")
    build_once "$dir" _build_base_initramfs
    printf '%s\n' "$dir/base.cpio.gz"
}

# overlay_cpio SRC_DIR OUT: uncompressed newc archive of SRC_DIR's contents, owned by root.
overlay_cpio() {
    (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$2"
}
