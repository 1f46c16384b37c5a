#!/bin/bash
# Build (or reuse from the cache) the images one harness part needs; prints KEY=VALUE lines.
#   build.sh kms   -> kernel + busybox/module initramfs for the plain KMS VMs
#   build.sh xen   -> kernel, Xen, Dom0 rootfs + stage-1 initramfs, DomU base initramfs
#   build.sh weston -> Weston + modetest tree (uncompressed cpio, lib/weston.sh)
#   build.sh weston-gl -> trixie Weston 14 + GL renderer on llvmpipe tree (lib/weston-gl.sh)
#   build.sh zcopy -> out-of-tree xen-gntdev (dma-buf) + vkms for Debian's kernel, driver-domain initramfs
#   build.sh dom0kernel -> the zero-copy Dom0 kernel (built from source; slow) + stage 1 without modules
#                          (replaced by `zcopy`; the harness uses it only with DISPLBACK_ZCOPY_DOM0=source)
#   build.sh arm64 -> Xen 4.20 + Linux 6.12 arm64 (Debian trixie), out-of-tree modules, base initramfs images
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/common.sh"
if [[ ${1:-} == arm64 ]]; then
    source "$HERE/arm64-chroot.sh"
    source "$HERE/arm64.sh"
    prepare_arm64_images
    echo "ARM64_KV=$ARM64_KV"
    echo "ARM64_XEN=$ARM64_XEN"
    echo "ARM64_XEN_VERSION=$ARM64_XEN_VERSION"
    echo "ARM64_IMAGE=$ARM64_IMAGE"
    echo "ARM64_DOM0_BASE=$ARM64_DOM0_BASE"
    echo "ARM64_DOMU_BASE=$ARM64_DOMU_BASE"
    echo "ARM64_KMODS=$ARM64_KMODS"
    echo "BUILD_SECS=$SECONDS"
    exit 0
fi
source "$HERE/kernel.sh"
source "$HERE/initramfs.sh"

prepare_kernel
echo "KVER=$KVER"
echo "VMLINUX=$VMLINUX"
echo "BZIMAGE=$BZIMAGE"
echo "BUSYBOX=$BUSYBOX"
case ${1:-} in
kms)
    echo "KMS_INITRAMFS=$(build_base_initramfs kms "bochs virtio-gpu virtio_pci")"
    ;;
xen)
    source "$HERE/xen.sh"
    prepare_xen
    echo "XEN=$XEN_BIN"
    echo "DOM0_IMG=$DOM0_IMG"
    echo "XEN_VERSION=$XEN_VERSION"
    echo "STAGE1_INITRAMFS=$(build_base_initramfs stage1 "virtio_pci virtio_blk ext4 crc32c_generic")"
    echo "DOMU_INITRAMFS=$(build_base_initramfs domu "drm_xen_front evdev")"
    ;;
weston)
    source "$HERE/weston.sh"
    prepare_weston
    echo "WESTON_CPIO=$WESTON_CPIO"
    echo "WESTON_BUILD_SECS=$WESTON_BUILD_SECS"
    ;;
weston-gl)
    source "$HERE/weston-gl.sh"
    prepare_weston_gl
    echo "WESTON_GL_CPIO=$WESTON_GL_CPIO"
    echo "WESTON_GL_BUILD_SECS=$WESTON_GL_BUILD_SECS"
    ;;
zcopy)
    source "$HERE/zcopy.sh"
    prepare_zcopy
    echo "ZC_GNTDEV_KO=$ZC_KMODS/xen-gntdev.ko"
    echo "ZC_VKMS_KO=$ZC_KMODS/vkms.ko"
    echo "ZC_UDMABUF_KO=$ZC_KMODS/udmabuf.ko"
    # kms-demo-udmabuf's plain VM: Debian's DRM modules VKMS needs (with their dependencies).
    echo "ZC_KMS_INITRAMFS=$(build_base_initramfs kms-vkms "drm drm_kms_helper drm_shmem_helper")"
    echo "ZC_KMODS_BUILD_SECS=$(cat "$ZC_KMODS/build-secs")"
    echo "ZC_DRVDOM_INITRAMFS=$ZC_DRVDOM_INITRAMFS"
    echo "STAGE1_INITRAMFS=$(build_base_initramfs stage1 "virtio_pci virtio_blk ext4 crc32c_generic")"
    ;;
dom0kernel)
    source "$HERE/dom0kernel.sh"
    # Its build tools under the apt lock first (builds run concurrently; prepare_dom0_kernel
    # would install them without it, and its text is part of the cached kernel's key).
    need=()
    for b in bison flex bc; do command -v "$b" >/dev/null 2>&1 || need+=("$b"); done
    command -v gcc >/dev/null 2>&1 && command -v make >/dev/null 2>&1 || need+=(build-essential)
    [[ -e /usr/include/libelf.h ]] || need+=(libelf-dev)
    [[ -e /usr/include/openssl/ssl.h ]] || need+=(libssl-dev)
    ((${#need[@]} == 0)) || apt_install "${need[@]}"
    prepare_dom0_kernel
    echo "DOM0K_VMLINUX=$DOM0K_VMLINUX"
    echo "DOM0K_RELEASE=$DOM0K_RELEASE"
    echo "DOM0K_BUILD_SECS=$(cat "$DOM0K_DIR/build-secs")"
    echo "STAGE1_NOMOD_INITRAMFS=$(build_base_initramfs stage1-nomod "")"
    ;;
*) die "usage: build.sh kms|xen|weston|weston-gl|zcopy|dom0kernel|arm64" ;;
esac
echo "BUILD_SECS=$SECONDS"
