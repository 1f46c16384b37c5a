//! Deliberately broken behaviour, for the VM harness's self-test only
//! (`scripts/domu-test/run --broken-build MODE`: the scenarios that prove a property must
//! FAIL with a backend that lacks it).
//!
//! Compiled in only with the `harness-broken` cargo feature, and the mode is fixed when
//! the binary is built (`DISPLBACK_BROKEN=MODE cargo build --features harness-broken`),
//! so nothing at run time can switch it on: a binary built without the feature (every
//! release, the .deb) has [`mode`] as a constant `None`.
//!
//! Modes:
//! * `skip-flip`: page flips are answered (the guest gets its flip event) but never
//!   reach the output: the screen keeps what SET_CONFIG showed first.
//! * `leak-maps`: guest mappings are never unmapped (a [`crate::xen::mem::MappedRegion`]
//!   forgets its release hook), so they outlive their buffers and their guest.

use std::time::Instant;

use crate::output::{
    ConnectorId, FbLayout, FlipDone, FrameSource, ImportId, ImportedFb, Output, OutputError,
    PixelSource, SeatInput,
};
use crate::zcopy::{DmaBufFd, DumbBuffer};

/// What is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    SkipFlip,
    LeakMaps,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::SkipFlip => "skip-flip",
            Mode::LeakMaps => "leak-maps",
        }
    }
}

/// The mode this binary was built with.
#[cfg(feature = "harness-broken")]
pub fn mode() -> Option<Mode> {
    match option_env!("DISPLBACK_BROKEN") {
        Some("skip-flip") => Some(Mode::SkipFlip),
        Some("leak-maps") => Some(Mode::LeakMaps),
        _ => None,
    }
}

/// The mode this binary was built with: none (built without `harness-broken`).
#[cfg(not(feature = "harness-broken"))]
pub const fn mode() -> Option<Mode> {
    None
}

/// True if this binary was built broken in `m`.
pub fn is(m: Mode) -> bool {
    mode() == Some(m)
}

/// Say loudly on stderr (machine-readable, before anything else, `--help` included) that
/// this binary is broken on purpose.
pub fn announce() {
    if let Some(m) = mode() {
        eprintln!(
            "DISPLBACK-BROKEN mode={} (harness self-test build: NOT a working backend)",
            m.name()
        );
    }
}

/// The same in the log (once logging is set up).
pub fn log() {
    if let Some(m) = mode() {
        tracing::warn!(
            mode = m.name(),
            "harness self-test build: broken on purpose"
        );
    }
}

/// `output` as this binary's mode wants it: in `skip-flip`, wrapped in [`SkipFlip`].
pub fn wrap_output(output: Box<dyn Output + Send>) -> Box<dyn Output + Send> {
    if is(Mode::SkipFlip) {
        Box::new(SkipFlip {
            inner: output,
            answered: Vec::new(),
        })
    } else {
        output
    }
}

/// An output whose page flips are reported done at once and never shown.
pub struct SkipFlip {
    inner: Box<dyn Output + Send>,
    answered: Vec<FlipDone>,
}

impl Output for SkipFlip {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError> {
        self.inner.add_connector(conn, unique_id, width, height)
    }
    fn remove_connector(&mut self, conn: ConnectorId) {
        self.answered.retain(|d| d.conn != conn);
        self.inner.remove_connector(conn)
    }
    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        self.inner.set_config(conn, frame)
    }
    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        // The defect: answer without showing.
        self.answered.push(FlipDone {
            conn,
            fb_cookie: frame.fb_cookie(),
        });
        Ok(())
    }
    fn flip_busy(&self, conn: ConnectorId) -> bool {
        self.inner.flip_busy(conn)
    }
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.event_fd()
    }
    fn next_deadline(&self) -> Option<Instant> {
        if self.answered.is_empty() {
            self.inner.next_deadline()
        } else {
            Some(Instant::now())
        }
    }
    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        self.inner.dispatch(now, done);
        done.append(&mut self.answered);
    }
    fn take_input(&mut self, out: &mut Vec<SeatInput>) {
        self.inner.take_input(out)
    }
    fn target(&self, conn: ConnectorId) -> Option<String> {
        self.inner.target(conn)
    }
    fn import_dmabuf(&mut self, dmabuf: &DmaBufFd) -> Result<ImportId, OutputError> {
        self.inner.import_dmabuf(dmabuf)
    }
    fn create_dumb(
        &mut self,
        width: u32,
        height: u32,
        bpp: u32,
    ) -> Result<(ImportId, Box<dyn DumbBuffer>), OutputError> {
        self.inner.create_dumb(width, height, bpp)
    }
    fn add_imported_fb(
        &mut self,
        import: ImportId,
        layout: &FbLayout,
    ) -> Result<ImportedFb, OutputError> {
        self.inner.add_imported_fb(import, layout)
    }
    fn remove_imported_fb(&mut self, fb: ImportedFb) {
        self.inner.remove_imported_fb(fb)
    }
    fn set_import_pixels(&mut self, import: ImportId, pixels: PixelSource) {
        self.inner.set_import_pixels(import, pixels)
    }
    fn release_import(&mut self, import: ImportId) {
        self.inner.release_import(import)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_feature_nothing_is_broken() {
        #[cfg(not(feature = "harness-broken"))]
        assert_eq!(mode(), None);
        #[cfg(feature = "harness-broken")]
        assert_eq!(
            mode().map(Mode::name),
            option_env!("DISPLBACK_BROKEN").filter(|m| ["skip-flip", "leak-maps"].contains(m))
        );
    }
}
