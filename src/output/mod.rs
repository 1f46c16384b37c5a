//! Where guest frames go: the [`Output`] seam, with a headless implementation (keeps
//! each connector's last frame, PNG dumps, 60 Hz flips) and KMS.

use std::os::fd::RawFd;
use std::time::Instant;

use crate::backend::mem::MappedRegion;
use crate::backend::DomId;
use crate::displif::format::PixelFormat;

pub mod convert;
pub mod headless;
pub mod kms;

/// One guest connector: (frontend domain, device id, connector index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectorId {
    pub dom: DomId,
    pub dev: u32,
    pub idx: u32,
}

/// A guest framebuffer to show, borrowed only for the duration of the call: an output
/// that needs the pixels later copies them, so no guest mapping outlives its buffer.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// The display buffer's mapping.
    pub mem: &'a MappedRegion,
    /// Byte offset of the first pixel in `mem` (`data_ofs`).
    pub offset: usize,
    pub width: u32,
    pub height: u32,
    /// Bytes per line; validated so that `offset + pitch * height <= mem.len()`.
    pub pitch: u32,
    pub format: PixelFormat,
    /// The guest's framebuffer cookie, echoed in the flip event.
    pub fb_cookie: u64,
}

/// A flip the output has completed (the scanout now shows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlipDone {
    pub conn: ConnectorId,
    pub fb_cookie: u64,
}

/// Why an output refused something. Each maps to the negative errno the guest gets.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("no physical connector for {0}")]
    NoConnector(String),
    #[error("physical connector {0} is in use by another guest connector")]
    InUse(String),
    #[error("physical connector {0} is not connected")]
    Disconnected(String),
    #[error("connector is not configured")]
    NotConfigured,
    #[error("format {0:?} cannot be shown")]
    Format(PixelFormat),
    #[error("{0}")]
    Device(#[from] std::io::Error),
}

impl OutputError {
    /// The errno for the guest's response status (positive; the caller negates).
    pub fn errno(&self) -> i32 {
        match self {
            OutputError::NoConnector(_) => libc::ENODEV,
            OutputError::InUse(_) => libc::EBUSY,
            OutputError::Disconnected(_) => libc::ENODEV,
            OutputError::NotConfigured => libc::EINVAL,
            OutputError::Format(_) => libc::EINVAL,
            OutputError::Device(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// The display seam: "show this framebuffer on this connector, tell me when the flip is done".
pub trait Output {
    /// A guest connector appears (at connect time). May refuse (no such physical
    /// connector, or one already taken by another guest connector).
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError>;
    /// The guest connector is gone: stop showing it, forget pending flips.
    fn remove_connector(&mut self, conn: ConnectorId);
    /// SET_CONFIG: show `frame` (enable), or disable with `None`.
    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&Frame<'_>>,
    ) -> Result<(), OutputError>;
    /// PG_FLIP: queue `frame`; its [`FlipDone`] comes from [`Output::dispatch`] later.
    /// A flip queued while one is pending replaces the queued one (latest wins), and the
    /// replaced one is still reported done.
    fn page_flip(&mut self, conn: ConnectorId, frame: &Frame<'_>) -> Result<(), OutputError>;
    /// A pollable fd that signals output events (DRM flip events), if any.
    fn event_fd(&self) -> Option<RawFd> {
        None
    }
    /// When [`Output::dispatch`] must be called next at the latest (timer-driven outputs).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Handle output events and due timers; append completed flips to `done`.
    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>);
}

/// Open the output `kind` names (`card` and `mapping` are for KMS).
pub fn open(
    kind: crate::config::OutputKind,
    card: Option<&std::path::Path>,
    mapping: std::collections::HashMap<String, String>,
) -> anyhow::Result<Box<dyn Output + Send>> {
    Ok(match kind {
        crate::config::OutputKind::Kms => Box::new(kms::Kms::open(card, mapping)?),
        crate::config::OutputKind::Headless => Box::new(headless::Headless::new()),
    })
}
