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
    local stamp=/run/displback-domu-test.trixie-apt-updated d=$TRIXIE_APT mirror
    [[ -e $stamp && -e $d/apt.conf ]] && return 0
    mirror=${DEBIAN_MIRROR:-$(apt-cache policy | awk '$3 == "bookworm/main" && $4 == "amd64" {print $2; exit}')}
    [[ -n $mirror ]] || die "cannot find a Debian mirror in apt's sources"
    mkdir -p "$d"/state/lists/partial "$d"/cache/archives/partial "$d"/etc/preferences.d
    touch "$d/state/status"
    echo "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
        > "$d/etc/sources.list"
    cat > "$d/apt.conf" <<EOC
Dir::State "$d/state"; Dir::State::status "$d/state/status"; Dir::Cache "$d/cache";
Dir::Etc::SourceList "$d/etc/sources.list"; Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "/nonexistent"; Dir::Etc::PreferencesParts "$d/etc/preferences.d";
APT::Architecture "amd64"; APT::Architectures { "amd64"; };
EOC
    log "apt-get update (private: trixie amd64)"
    trixie_apt apt-get update -q >/dev/null || die "apt-get update (trixie amd64) failed"
    touch "$stamp"
}

_build_weston_gl() { # $1 = output dir
    local out=$1 t0=$SECONDS
    trixie_apt python3 "$LIB_DIR/debtree.py" "$LIB_DIR/../weston-gl/tree.spec" "$out/root" > "$out/stats" || return 1
    mkdir -p "$out/root/usr/share/fontconfig" "$out/root/var/cache/fontconfig"
    (cd "$out/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out/weston.cpio"
    du -sb "$out/root" | awk '{print "tree_bytes=" $1}' >> "$out/stats"
    rm -rf --one-file-system "$out/root" "$out/pool"
    echo $((SECONDS - t0)) > "$out/build-secs"
    log "weston-gl tree: $(tr '\n' ' ' < "$out/stats") cpio=$(stat -c %s "$out/weston.cpio") in $((SECONDS - t0)) s"
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
