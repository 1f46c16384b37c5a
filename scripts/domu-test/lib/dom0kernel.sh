# The zero-copy Dom0 kernel (sourced by build.sh after common.sh): Debian's
# linux-source-6.1 built with lib/dom0-kernel.config merged onto x86_64_defconfig +
# xen.config (gntdev dma-buf, bochs and virtio-gpu built in, no modules). Slow: tens of
# minutes on 2 cores, so it is cached by content (source .deb + fragment + this script)
# and only built for the scenarios that need it (group `zcopy`).
# Sets DOM0K_DIR (vmlinux, bzImage, config, build-secs), DOM0K_VMLINUX, DOM0K_RELEASE.

DOM0K_FRAGMENT=$LIB_DIR/dom0-kernel.config

_build_dom0_kernel() { # $1 = output dir
    local out=$1 src=$1/src t0 missing
    t0=$(date +%s)
    log "unpacking $(basename "$DOM0K_SRC_DEB")"
    dpkg-deb --fsys-tarfile "$DOM0K_SRC_DEB" | tar -x -O --wildcards './usr/src/linux-source-*.tar.xz' \
        | xz -d | tar -x -C "$out" || return 1
    mv "$out"/linux-source-* "$src"
    (
        cd "$src"
        make -s x86_64_defconfig && make -s xen.config \
            && scripts/kconfig/merge_config.sh -m .config "$DOM0K_FRAGMENT" >/dev/null \
            && make -s olddefconfig
    ) > "$out/config.log" 2>&1 || { tail -20 "$out/config.log" >&2; return 1; }
    # A wanted =y that olddefconfig dropped (unmet dependency) is an error, not a surprise later.
    missing=$(grep -E '^CONFIG_[A-Z0-9_]+=y' "$DOM0K_FRAGMENT" | while read -r l; do
        grep -qx "$l" "$src/.config" || echo "${l%%=*}"; done)
    [[ -z $missing ]] || { log "config lost: $missing"; return 1; }
    log "make -j$(nproc) bzImage (log: $out/make.log)"
    make -C "$src" -j"$(nproc)" bzImage > "$out/make.log" 2>&1 || { tail -30 "$out/make.log" >&2; return 1; }
    cp "$src/.config" "$out/config"
    cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
    # Uncompressed ELF for Xen (decompressing under TCG costs seconds).
    objcopy --strip-debug "$src/vmlinux" "$out/vmlinux"
    make -s -C "$src" kernelrelease > "$out/release"
    echo $(( $(date +%s) - t0 )) > "$out/build-secs"
    rm -rf "$src"
    log "Dom0 kernel built in $(cat "$out/build-secs") s"
}

prepare_dom0_kernel() {
    local need=() b
    for b in bison:bison flex:flex gcc:build-essential make:build-essential bc:bc; do
        command -v "${b%%:*}" >/dev/null 2>&1 || need+=("${b#*:}")
    done
    [[ -e /usr/include/libelf.h ]] || need+=(libelf-dev)
    [[ -e /usr/include/openssl/ssl.h ]] || need+=(libssl-dev)
    if ((${#need[@]})); then
        apt_updated
        log "installing kernel build tools: ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
            || die "apt-get install ${need[*]} failed"
    fi
    apt_updated
    DOM0K_SRC_DEB=$(fetch_deb linux-source-6.1)
    DOM0K_DIR=$CACHE/dom0kernel-$(content_hash "$DOM0K_SRC_DEB" "$DOM0K_FRAGMENT" "$LIB_DIR/dom0kernel.sh")
    [[ -e $DOM0K_DIR/.done ]] || log "building the zero-copy Dom0 kernel (not cached: expect 10-25 min on 2 cores)"
    build_once "$DOM0K_DIR" _build_dom0_kernel
    DOM0K_VMLINUX=$DOM0K_DIR/vmlinux
    DOM0K_RELEASE=$(cat "$DOM0K_DIR/release")
    export DOM0K_DIR DOM0K_VMLINUX DOM0K_RELEASE
}
