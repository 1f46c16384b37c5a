# The `arm64` group's images (sourced by build.sh after common.sh and arm64-chroot.sh):
# Xen 4.20 and Linux 6.12 from Debian trixie arm64, three out-of-tree modules built in the
# chroot against Debian's arm64 headers, and two base initramfs images. Cached by content:
#   $CACHE/arm64-kmods-<hash>   xen-gntdev.ko with CONFIG_XEN_GNTDEV_DMABUF, drm_xen_front.ko
#                               (DomU), vkms.ko (Dom0), each with its lib/arm64/<module>-*.patch:
#                               gntdev vmap + dma_dev; xen-drm-front max height 4095 (stock
#                               2047 rules out 3840x2160 guests) and a 30 s wait for the
#                               backend (3 s is too short under TCG at 4K); VKMS a 3840x2160 mode
#                               and a second CRTC + connector (module parameter outputs=2)
#   $CACHE/arm64-images-<hash>  xen, Image, dom0-base.cpio.gz, domu-base.cpio.gz
# Sets ARM64_XEN ARM64_IMAGE ARM64_DOM0_BASE ARM64_DOMU_BASE ARM64_XEN_VERSION.

ARM64_XEN_PKG=xen-hypervisor-4.20-arm64
# Dom0 userspace for a by-hand toolstack: the Xen tools and the shared libraries their
# binaries need (apt's closure would also pull systemd, python3 and perl), kmod, bash.
ARM64_DOM0_DEBS="libc6 libgcc-s1 gcc-14-base zlib1g liblzma5 libzstd1 libbz2-1.0 libuuid1 libblkid1 \
libselinux1 libpcre2-8-0 libsystemd0 libcap2 libtinfo6 libncursesw6 libyajl2 libfdt1 libkmod2 kmod \
libssl3t64 libxentoolcore1 libxentoollog1 libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 \
libxengnttab1 libxenhypfs1 libxenstore4 libxenmisc4.20 xenstore-utils xen-utils-common xen-utils-4.20 \
libext2fs2t64 libcom-err2 libgcrypt20 libgpg-error0 liblz4-1 libcap-ng0 libaudit1 libseccomp2 bash strace"
# Modules from Debian's kernel (+ dependencies); the out-of-tree ones are added to the tree.
ARM64_DOM0_MODULES="xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd vkms"
ARM64_DOMU_MODULES="drm_xen_front"

_build_arm64_kmods() { # $1 = output dir
    local out=$1 k=$1/src mnt=/mnt/kmod-$$ m
    mkdir -p "$k"
    dpkg-deb --fsys-tarfile "$ARM64_SRC_DEB" | tar -x -O --wildcards './usr/src/linux-source-*.tar.xz' | xz -d \
        | tar -x -C "$k" --strip-components=1 --wildcards 'linux-source-6.12/drivers/gpu/drm/xen/*' \
            'linux-source-6.12/drivers/gpu/drm/vkms/*' 'linux-source-6.12/drivers/xen/gntdev*' || return 1
    mkdir -p "$k"/{gntdev,xenfront,vkms}
    cp "$k"/drivers/xen/gntdev* "$k/gntdev/"
    cp "$k"/drivers/gpu/drm/xen/*.[ch] "$k/xenfront/"
    cp "$k"/drivers/gpu/drm/vkms/*.[ch] "$k/vkms/"
    # lib/arm64/<module>-*.patch applies to that module's sources (gntdev, xenfront, vkms).
    for p in "$LIB_DIR"/arm64/*.patch; do
        m=${p##*/}; m=${m%%-*}
        [ -d "$k/$m" ] || { log "patch $p: no module '$m'"; return 1; }
        patch -d "$k/$m" -p1 --no-backup-if-mismatch < "$p" >&2 || { log "patch $p failed"; return 1; }
    done
    printf 'ccflags-y += -DCONFIG_XEN_GNTDEV_DMABUF=1\nobj-m := xen-gntdev.o\nxen-gntdev-y := gntdev.o gntdev-dmabuf.o\n' \
        > "$k/gntdev/Kbuild"
    printf 'obj-m := drm_xen_front.o\ndrm_xen_front-y := %s\n' "$(cd "$k/xenfront" && ls *.c | sed 's/\.c$/.o/' | tr '\n' ' ')" \
        > "$k/xenfront/Kbuild"
    printf 'obj-m := vkms.o\nvkms-y := %s\n' "$(cd "$k/vkms" && ls *.c | sed 's/\.c$/.o/' | tr '\n' ' ')" > "$k/vkms/Kbuild"
    for m in gntdev xenfront vkms; do
        log "make M=$m (arm64, Linux $ARM64_KV headers)"
        arm64_chroot_run "$k/$m" "$mnt" make -C "/usr/src/linux-headers-$ARM64_KV-arm64" M="$mnt" ARCH=arm64 \
            CROSS_COMPILE=aarch64-linux-gnu- -j"$(nproc)" modules > "$out/make-$m.log" 2>&1 \
            || { tail -20 "$out/make-$m.log" >&2; return 1; }
    done
    cp "$k/gntdev/xen-gntdev.ko" "$out/xen-gntdev-dmabuf.ko"
    cp "$k/xenfront/drm_xen_front.ko" "$k/vkms/vkms.ko" "$out/"
    rm -rf "$k"
}

# Unpack the arm64 .debs of $2... into $1 (dpkg-deb -x, no maintainer scripts).
_unpack_debs() {
    local dest=$1 d; shift
    mkdir -p "$dest"
    for d in "$@"; do dpkg-deb -x "$d" "$dest" || return 1; done
}

# The names among $2... that are modules (not built into the kernel of module dir $1).
_not_builtin() {
    local md=$1 n; shift
    for n in "$@"; do
        grep -qE "/${n//[-_]/[-_]}\.ko" "$md/modules.builtin" || echo "$n"
    done
}

_arm64_cpio() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$2"; }

_build_arm64_images() { # $1 = output dir
    local out=$1 kx=$1/kernel d=$1/dom0 u=$1/domu md m b
    _unpack_debs "$kx" "$ARM64_KERNEL_DEB" "$ARM64_XENHYP_DEB" "$ARM64_BUSYBOX_DEB" || return 1
    cp "$kx/boot/xen-4.20-arm64" "$out/xen"
    # Debian's arm64 vmlinuz is a plain arm64 Image (Xen and guest-loader take it as is).
    if gzip -t "$kx/boot/vmlinuz-$ARM64_KV-arm64" 2>/dev/null; then
        zcat "$kx/boot/vmlinuz-$ARM64_KV-arm64" > "$out/Image"
    else
        cp "$kx/boot/vmlinuz-$ARM64_KV-arm64" "$out/Image"
    fi
    md=$kx/usr/lib/modules/$ARM64_KV-arm64
    install -D -m644 "$ARM64_KMODS/vkms.ko" "$md/extra/vkms.ko"
    install -D -m644 "$ARM64_KMODS/drm_xen_front.ko" "$md/extra/drm_xen_front.ko"
    depmod -b "$kx/usr" "$ARM64_KV-arm64"
    # Dom0: Xen tools + libraries, busybox, the modules (modprobe-able tree), the DomU kernel.
    _unpack_debs "$d" $ARM64_DOM0_DEBS_FILES || return 1
    for m in bin sbin lib; do [[ -e $d/$m ]] || ln -s "usr/$m" "$d/$m"; done
    cp "$kx/usr/bin/busybox" "$d/usr/bin/busybox"
    python3 "$LIB_DIR/modclosure.py" "$md" $(_not_builtin "$md" $ARM64_DOM0_MODULES) > "$out/dom0-modules"
    while read -r m; do install -D -m644 "$md/$m" "$d/usr/lib/modules/$ARM64_KV-arm64/$m"; done < "$out/dom0-modules"
    cp "$md"/modules.{order,builtin,builtin.modinfo} "$d/usr/lib/modules/$ARM64_KV-arm64/"
    depmod -b "$d/usr" "$ARM64_KV-arm64"
    install -D -m644 "$ARM64_KMODS/xen-gntdev-dmabuf.ko" "$d/usr/lib/modules/harness/xen-gntdev-dmabuf.ko"
    mkdir -p "$d"/{proc,sys,dev,run,tmp,boot,harness,etc/xen} "$d/var/log/xen/console" "$d/var/lib/xen"
    cp "$out/Image" "$d/boot/Image"
    rm -rf "$d"/usr/share/{doc,man,info,locale,lintian}
    # DomU: busybox + drm_xen_front and its dependencies (/etc/modules.load, as on x86).
    mkdir -p "$u"/{bin,sbin,dev,proc,sys,tmp,run,mnt,lib/modules,etc}
    cp "$kx/usr/bin/busybox" "$u/bin/busybox"
    ln -s busybox "$u/bin/sh"
    : > "$u/etc/modules.load"
    python3 "$LIB_DIR/modclosure.py" "$md" $ARM64_DOMU_MODULES > "$out/domu-modules"
    while read -r m; do   # decompressed: busybox insmod then needs no xz support
        b=$(basename "${m%.xz}")
        case $m in *.xz) xz -dc "$md/$m" > "$u/lib/modules/$b" ;; *) install -m644 "$md/$m" "$u/lib/modules/$b" ;; esac
        echo "/lib/modules/$b" >> "$u/etc/modules.load"
    done < "$out/domu-modules"
    _arm64_cpio "$d" "$out/dom0-base.cpio.gz"
    _arm64_cpio "$u" "$out/domu-base.cpio.gz"
    dpkg-deb -f "$ARM64_XENHYP_DEB" Version > "$out/xen-version"
    du -sh "$d" "$u" "$out"/*.cpio.gz | sed 's/^/arm64 images: /' >&2
    rm -rf "$kx" "$d" "$u"
}

prepare_arm64_images() {
    prepare_arm64_chroot
    command -v qemu-system-aarch64 >/dev/null || apt_install qemu-system-arm
    ARM64_SRC_DEB=$(arm64_fetch linux-source-6.12)
    # Keyed by the source, the chroot (its path names its hash), the patches and the
    # builder's own text (not this whole file: image changes must not rebuild modules).
    ARM64_KMODS=$CACHE/arm64-kmods-$(content_hash "$ARM64_SRC_DEB" "$ARM64_ROOT" "$LIB_DIR"/arm64/*.patch \
        "$(declare -f _build_arm64_kmods)")
    build_once "$ARM64_KMODS" _build_arm64_kmods
    local debs
    debs=$(arm64_fetch "linux-image-$ARM64_KV-arm64" "$ARM64_XEN_PKG" busybox-static $ARM64_DOM0_DEBS) || exit 1
    ARM64_KERNEL_DEB=$(sed -n 1p <<< "$debs")
    ARM64_XENHYP_DEB=$(sed -n 2p <<< "$debs")
    ARM64_BUSYBOX_DEB=$(sed -n 3p <<< "$debs")
    ARM64_DOM0_DEBS_FILES=$(tail -n +4 <<< "$debs" | tr '\n' ' ')
    local dir=$CACHE/arm64-images-$(content_hash "$ARM64_KERNEL_DEB" "$ARM64_XENHYP_DEB" "$ARM64_BUSYBOX_DEB" \
        $ARM64_DOM0_DEBS_FILES "$ARM64_KMODS" "$ARM64_KMODS/xen-gntdev-dmabuf.ko" "$ARM64_KMODS/vkms.ko" \
        "$ARM64_KMODS/drm_xen_front.ko" "$ARM64_DOM0_MODULES" "$ARM64_DOMU_MODULES" "$LIB_DIR/arm64.sh" \
        "$LIB_DIR/modclosure.py")
    build_once "$dir" _build_arm64_images
    ARM64_XEN=$dir/xen
    ARM64_IMAGE=$dir/Image
    ARM64_DOM0_BASE=$dir/dom0-base.cpio.gz
    ARM64_DOMU_BASE=$dir/domu-base.cpio.gz
    ARM64_XEN_VERSION=$(cat "$dir/xen-version")
    export ARM64_XEN ARM64_IMAGE ARM64_DOM0_BASE ARM64_DOMU_BASE ARM64_XEN_VERSION
}
