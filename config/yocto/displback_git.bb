# Example recipe for a meta-layer (UNBUILT here: reviewed against poky's cargo and
# cargo-update-recipe-crates bbclasses, not run through bitbake; see README "Yocto").
SUMMARY = "Xen para-virtual display backend (vdispl / displif)"
DESCRIPTION = "displback serves the para-virtual displays of Xen guests running \
Linux's xen-drm-front, on KMS or headless."
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=786eb764114a4c7419f4fd768a71b2ab \
                    file://LICENSE-APACHE;md5=22a53954e4e0ec258dfce4391e905dac"

# Point this at your copy of the repository and pin the commit.
SRC_URI = "git://git.example.org/displback.git;protocol=https;branch=main"
SRCREV = "0000000000000000000000000000000000000000"
PV = "0.1.0+git"
# Where the git fetcher unpacks: ${UNPACKDIR}/git since Yocto 5.1 (${WORKDIR}/git before).
S = "${UNPACKDIR}/git"

# Cargo.toml's rust-version is 1.85: the release's `rust` recipe must be at least that
# (poky scarthgap's 1.75 is too old); check `bitbake -e rust | grep ^PV=`.

# cargo: builds with the crates fetched from SRC_URI (crate://), offline.
# cargo-update-recipe-crates: `bitbake -c update_crates displback` regenerates
# displback-crates.inc from Cargo.lock (scripts/update-yocto-crates writes the same file
# without bitbake; scripts/test checks it matches Cargo.lock).
inherit cargo cargo-update-recipe-crates systemd

require ${BPN}-crates.inc

# Only the backend; src/bin/{guest_client,scanout_check} are test tools.
CARGO_BUILD_FLAGS += "--bin displback"

do_install:append() {
    # cargo_do_install installs every binary it finds; keep the backend only.
    rm -f ${D}${bindir}/guest_client ${D}${bindir}/scanout_check
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/config/displback.service ${S}/config/displback@.service \
        ${D}${systemd_system_unitdir}/
    install -d ${D}${sysconfdir}/displback
    install -m 0644 ${S}/config/displback.toml ${D}${sysconfdir}/displback/displback.toml
    # The units run /usr/bin/displback: make sure ${bindir} is that.
    if [ "${bindir}" != "/usr/bin" ]; then
        sed -i 's#/usr/bin/displback#${bindir}/displback#' ${D}${systemd_system_unitdir}/displback*.service
    fi
}

# Man pages and completions come from `displback gen-assets DIR`, which needs the binary
# to run: on a cross build that means the target binary under qemu-user (inherit qemu,
# ${@qemu_wrapper_cmdline(d, ...)}) or a -native build; not done in this example.

SYSTEMD_SERVICE:${PN} = "displback.service displback@.service"
# displback takes the display (DRM master): enable it in your image, not by default.
SYSTEMD_AUTO_ENABLE:${PN} = "disable"
CONFFILES:${PN} = "${sysconfdir}/displback/displback.toml"
# xenstored and the xen device modules come from meta-virtualization.
RRECOMMENDS:${PN} = "xen-tools-xenstored kernel-module-xen-gntdev kernel-module-xen-evtchn"
