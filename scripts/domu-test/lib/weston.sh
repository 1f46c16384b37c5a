# Weston image piece (sourced by build.sh after common.sh): Debian 12's Weston with the DRM
# backend (pixman renderer: no GPU or GL at run time), its desktop/kiosk/ivi shells, a few
# clients, libdrm's modetest, xkb data, fonts and the weston.ini files, as an UNCOMPRESSED
# cpio archive to put in front of a base initramfs (the kernel does not continue after a
# gzip member; see initramfs.sh). Only the programs listed in weston/tree.spec and the
# libraries they need (DT_NEEDED closure, lib/debtree.py) go in. The run-time files
# (weston/weston-run, weston/weston.ini) are not cached: weston.py's overlay_files() puts
# them into each run's overlay. Sets WESTON_CPIO; build time in $dir/build-secs,
# size and package list next to it.

_build_weston() { # $1 = output dir
    # glibc's loader finds /lib/x86_64-linux-gnu and /usr/lib/x86_64-linux-gnu by itself;
    # /lib64 is where the programs' PT_INTERP points.
    build_tree_cpio "$1" "$LIB_DIR/../weston/tree.spec" weston
}

prepare_weston() {
    local seeds v=""
    for seeds in weston libweston-10-0 libdrm-tests xkb-data fonts-dejavu-core fontconfig-config libc6; do
        v="$v $seeds=$(pkg_version "$seeds")"
    done
    local dir=$CACHE/weston-$(content_hash "$v" "$LIB_DIR/weston.sh" "$LIB_DIR/debtree.py" \
        "$LIB_DIR/../weston/tree.spec")
    build_once "$dir" _build_weston
    WESTON_CPIO=$dir/weston.cpio
    WESTON_BUILD_SECS=$(cat "$dir/build-secs")
    export WESTON_CPIO WESTON_BUILD_SECS
}
