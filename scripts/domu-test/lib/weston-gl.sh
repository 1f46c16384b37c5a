# Weston GL image piece (sourced by build.sh after common.sh): Debian 13 (trixie)'s
# Weston 14 with the GL renderer on Mesa's llvmpipe (software GL, EGL on GBM's kms_swrast:
# no GPU), the first real compositor here that imports dma-bufs (zwp_linux_dmabuf_v1;
# Weston's pixman renderer takes only wl_shm).
# Same tree builder (weston-gl/tree.spec) with a private apt configuration for trixie
# amd64 ($CACHE/trixie-apt; the host's apt state is never touched), lists updated once per
# host boot. Sets WESTON_GL_CPIO and WESTON_GL_BUILD_SECS.
TRIXIE_APT=$CACHE/trixie-apt
trixie_apt() { APT_CONFIG=$TRIXIE_APT/apt.conf "$@"; }
trixie_apt_updated() { mkdir -p "$TRIXIE_APT"; locked "$TRIXIE_APT/.lock" _trixie_apt_updated; }
_trixie_apt_updated() {
    private_apt_updated "$TRIXIE_APT" amd64 trixie \
        "${DEBIAN_MIRROR:-$(apt-cache policy | awk '$3 == "bookworm/main" && $4 == "amd64" {print $2; exit}')}"
}

_build_weston_gl() { # $1 = output dir
    build_tree_cpio "$1" "$LIB_DIR/../weston-gl/tree.spec" weston-gl trixie_apt
}

prepare_weston_gl() {
    trixie_apt_updated
    local seeds v=""
    for seeds in weston libweston-14-0 mesa-libgallium libegl-mesa0 libgbm1 libllvm19 wayland-utils libc6; do
        v="$v $seeds=$(trixie_apt apt-cache policy "$seeds" | awk '/Candidate:/ {print $2}')"
    done
    local dir=$CACHE/weston-gl-$(content_hash "$v" "$LIB_DIR/weston-gl.sh" "$LIB_DIR/debtree.py" \
        "$LIB_DIR/../weston-gl/tree.spec")
    build_once "$dir" _build_weston_gl
    WESTON_GL_CPIO=$dir/weston.cpio
    WESTON_GL_BUILD_SECS=$(cat "$dir/build-secs")
    export WESTON_GL_CPIO WESTON_GL_BUILD_SECS
}
