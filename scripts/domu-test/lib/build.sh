#!/bin/bash
# Build (or reuse from the cache) the images one harness part needs; prints KEY=VALUE lines.
#   build.sh kms   -> kernel + busybox/module initramfs for the plain KMS VMs
#   build.sh xen   -> kernel, Xen, Dom0 rootfs + stage-1 initramfs, DomU base initramfs
#   build.sh dom0kernel -> the zero-copy Dom0 kernel (built from source; slow) + stage 1 without modules
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/common.sh"
source "$HERE/kernel.sh"
source "$HERE/initramfs.sh"

prepare_kernel
echo "KVER=$KVER"
echo "VMLINUX=$VMLINUX"
echo "BZIMAGE=$BZIMAGE"
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
    echo "DOMU_INITRAMFS=$(build_base_initramfs domu "drm_xen_front")"
    ;;
dom0kernel)
    source "$HERE/dom0kernel.sh"
    prepare_dom0_kernel
    echo "DOM0K_VMLINUX=$DOM0K_VMLINUX"
    echo "DOM0K_RELEASE=$DOM0K_RELEASE"
    echo "DOM0K_BUILD_SECS=$(cat "$DOM0K_DIR/build-secs")"
    echo "STAGE1_NOMOD_INITRAMFS=$(build_base_initramfs stage1-nomod "")"
    ;;
*) die "usage: build.sh kms|xen|dom0kernel" ;;
esac
