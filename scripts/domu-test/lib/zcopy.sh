# The x86 zero-copy group's kernel pieces (sourced by build.sh after common.sh, kernel.sh
# and initramfs.sh): Debian's own bookworm kernel (the stock Dom0 kernel, $KVER) plus two
# modules built out of tree against linux-headers of that SAME package version, instead of
# a whole kernel built from linux-source-6.1 (lib/dom0kernel.sh: 8-26 min cold; this ~1 min):
#   xen-gntdev.ko  with CONFIG_XEN_GNTDEV_DMABUF. Debian has XEN_GNTDEV=m but neither
#                  XEN_GNTDEV_DMABUF nor XEN_GRANT_DMA_ALLOC (the built-in grant-table DMA
#                  allocator); the dma-buf ioctls do not need the allocator, only gntdev's
#                  dma_dev, which lib/arm64/gntdev-dmabuf-without-grant-dma-alloc.patch
#                  makes exist under either option (same patch as the arm64 group's).
#                  DMA_SHARED_BUFFER is =y in Debian's kernel.
#   vkms.ko        Debian has no DRM_VKMS; the PVH driver domain's display, and the
#                  display of kms-demo-udmabuf; with lib/arm64/vkms-uhd-mode.patch (a
#                  3840x2160 mode, absent from the DMT list VKMS offers: zero-copy needs a
#                  mode of exactly the guest's size, for the bench's 4K row).
#   udmabuf.ko     Debian has no UDMABUF; with lib/dom0-udmabuf-vmap.patch (vmap, which
#                  upstream gained after 6.1, so VKMS can compose an imported udmabuf;
#                  the allow_vmap parameter turns it off for the per-buffer fallback):
#                  kms-demo-udmabuf's dma-buf exporter of the simulator's memfd pages.
# Cached in $CACHE/zcopy-kmods-<hash> (hash of the four .debs, the patches and the
# builder's text). Also the driver domain's base initramfs: busybox, Debian's Xen/DRM modules and
# the two above, in load order (/etc/modules.load; drvdom-init insmods them).
# Sets ZC_KMODS (dir: xen-gntdev.ko vkms.ko udmabuf.ko build-secs), ZC_DRVDOM_INITRAMFS.

ZC_PATCH=$LIB_DIR/arm64/gntdev-dmabuf-without-grant-dma-alloc.patch
ZC_UDMABUF_PATCH=$LIB_DIR/dom0-udmabuf-vmap.patch
ZC_VKMS_PATCH=$LIB_DIR/arm64/vkms-uhd-mode.patch
# Debian modules of the driver domain (+ their dependencies), loaded before the two above.
ZC_DRVDOM_MODULES="xen-evtchn xen-gntalloc xen-privcmd xenfs drm drm_kms_helper drm_shmem_helper"

_build_zcopy_kmods() { # $1 = output dir
    local out=$1 k=$1/src hdr=$1/hdr t0=$SECONDS d m mk
    mkdir -p "$k"/{gntdev,vkms,udmabuf} "$hdr"
    for d in "$ZC_HDR_DEB" "$ZC_HDR_COMMON_DEB" "$ZC_KBUILD_DEB"; do dpkg-deb -x "$d" "$hdr" || return 1; done
    mk=$hdr/usr/src/linux-headers-$KVER
    # Its Makefile includes the -common one by absolute path (/usr/src/...): point it here.
    sed -i "s|^include /usr/src/|include $hdr/usr/src/|" "$mk/Makefile"
    grep -q "^include $hdr/" "$mk/Makefile" || { log "unexpected $mk/Makefile: $(cat "$mk/Makefile")"; return 1; }
    log "unpacking drivers/xen/gntdev*, drivers/gpu/drm/vkms and udmabuf from $(basename "$ZC_SRC_DEB")"
    dpkg-deb --fsys-tarfile "$ZC_SRC_DEB" | tar -x -O --wildcards './usr/src/linux-source-*.tar.xz' | xz -d \
        | tar -x -C "$k" --strip-components=1 --wildcards '*/drivers/gpu/drm/vkms/*' '*/drivers/xen/gntdev*' \
            '*/drivers/dma-buf/udmabuf.c' \
        || return 1
    cp "$k"/drivers/xen/gntdev* "$k/gntdev/"
    cp "$k"/drivers/gpu/drm/vkms/*.[ch] "$k/vkms/"
    cp "$k"/drivers/dma-buf/udmabuf.c "$k/udmabuf/"
    patch -d "$k/vkms" -p1 --no-backup-if-mismatch < "$ZC_VKMS_PATCH" >&2 \
        || { log "patch $ZC_VKMS_PATCH failed"; return 1; }
    # The patch names drivers/dma-buf/udmabuf.c in a kernel tree: -p3 leaves udmabuf.c.
    patch -d "$k/udmabuf" -p3 --no-backup-if-mismatch < "$ZC_UDMABUF_PATCH" >&2 \
        || { log "patch $ZC_UDMABUF_PATCH failed"; return 1; }
    # Out of tree it may only use exported symbols: no hugetlbfs memfds (refused, as any
    # file that is not shmem), the seals read from the shmem inode instead of the
    # unexported memfd_fcntl(), and the DMA_BUF symbol namespace imported.
    sed -i -e 's/is_file_hugepages(memfd)/false/g' \
        -e 's/memfd_fcntl(memfd, F_GET_SEALS, 0)/(shmem_file(memfd) ? (int)SHMEM_I(file_inode(memfd))->seals : -EINVAL)/' \
        -e 's|^#include <linux/hugetlb.h>|#include <linux/hugetlb.h>\n#include <linux/shmem_fs.h>|' \
        "$k/udmabuf/udmabuf.c"
    echo 'MODULE_IMPORT_NS(DMA_BUF);' >> "$k/udmabuf/udmabuf.c"
    ! grep -n 'is_file_hugepages\|memfd_fcntl' "$k/udmabuf/udmabuf.c" >&2 || { log "udmabuf.c: unexpected text"; return 1; }
    printf 'obj-m := udmabuf.o\n' > "$k/udmabuf/Kbuild"
    patch -d "$k/gntdev" -p1 --no-backup-if-mismatch < "$ZC_PATCH" >&2 || { log "patch $ZC_PATCH failed"; return 1; }
    printf 'ccflags-y += -DCONFIG_XEN_GNTDEV_DMABUF=1\nobj-m := xen-gntdev.o\nxen-gntdev-y := gntdev.o gntdev-dmabuf.o\n' \
        > "$k/gntdev/Kbuild"
    printf 'obj-m := vkms.o\nvkms-y := %s\n' "$(cd "$k/vkms" && ls *.c | sed 's/\.c$/.o/' | tr '\n' ' ')" > "$k/vkms/Kbuild"
    for m in gntdev vkms udmabuf; do
        log "make M=$m (Linux $KVER headers)"
        nice -n 10 make -C "$mk" M="$k/$m" -j"$(nproc)" modules > "$out/make-$m.log" 2>&1 \
            || { tail -20 "$out/make-$m.log" >&2; return 1; }
        # An unresolved symbol would only show when the module is loaded in the VM.
        ! grep -E 'WARNING: modpost: .*undefined' "$out/make-$m.log" >&2 || return 1
    done
    cp "$k/gntdev/xen-gntdev.ko" "$k/vkms/vkms.ko" "$k/udmabuf/udmabuf.ko" "$out/"
    [[ $(modinfo -F vermagic "$out/xen-gntdev.ko") == "$KVER "* ]] || { log "vermagic is not $KVER"; return 1; }
    rm -rf "$k" "$hdr"
    echo $((SECONDS - t0)) > "$out/build-secs"
    log "zero-copy modules built in $(cat "$out/build-secs") s"
}

_build_drvdom_initramfs() { # $1 = output dir
    local out=$1 root=$1/root m
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,mnt,lib/modules,etc}
    cp "$BUSYBOX" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    python3 "$LIB_DIR/modclosure.py" "$KDIR/lib/modules/$KVER" $ZC_DRVDOM_MODULES > "$out/order" || return 1
    : > "$root/etc/modules.load"
    while read -r m; do
        install -D -m644 "$KDIR/lib/modules/$KVER/$m" "$root/lib/modules/$(basename "$m")"
        echo "/lib/modules/$(basename "$m")" >> "$root/etc/modules.load"
    done < "$out/order"
    for m in xen-gntdev.ko vkms.ko; do   # out of tree, after their dependencies
        install -m644 "$ZC_KMODS/$m" "$root/lib/modules/$m"
        echo "/lib/modules/$m" >> "$root/etc/modules.load"
    done
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 > "$out/base.cpio.gz"
    rm -rf "$root"
}

prepare_zcopy() {
    local ver series
    # gcc 12 (what Debian built the kernel with) and make; kbuild's own tools are prebuilt.
    command -v make >/dev/null && command -v gcc >/dev/null || apt_install gcc make
    # The headers, kbuild and source of exactly the kernel package the Dom0 runs.
    ver=$(dpkg-deb -f "$KERNEL_DEB" Version)
    series=${KVER%%.*}.$(cut -d. -f2 <<< "$KVER")   # 6.1
    ZC_SRC_DEB=$(fetch_deb "linux-source-$series=$ver")
    ZC_HDR_DEB=$(fetch_deb "linux-headers-$KVER=$ver")
    ZC_HDR_COMMON_DEB=$(fetch_deb "linux-headers-${KVER%-amd64}-common=$ver")
    ZC_KBUILD_DEB=$(fetch_deb "linux-kbuild-$series=$ver")
    ZC_KMODS=$CACHE/zcopy-kmods-$(content_hash "$ZC_SRC_DEB" "$ZC_HDR_DEB" "$ZC_HDR_COMMON_DEB" "$ZC_KBUILD_DEB" \
        "$ZC_PATCH" "$ZC_UDMABUF_PATCH" "$ZC_VKMS_PATCH" "$(declare -f _build_zcopy_kmods)")
    build_once "$ZC_KMODS" _build_zcopy_kmods
    local dir=$CACHE/initramfs-drvdom-$(content_hash "$KDIR" "$BUSYBOX" "$ZC_KMODS" "$ZC_KMODS/xen-gntdev.ko" \
        "$ZC_KMODS/vkms.ko" "$ZC_DRVDOM_MODULES" "$(declare -f _build_drvdom_initramfs)" "$LIB_DIR/modclosure.py")
    build_once "$dir" _build_drvdom_initramfs
    ZC_DRVDOM_INITRAMFS=$dir/base.cpio.gz
    export ZC_KMODS ZC_DRVDOM_INITRAMFS
}
