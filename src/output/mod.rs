//! Where guest frames go: the [`Output`] seam, with a headless implementation (keeps
//! each connector's last frame, PNG dumps, 60 Hz flips) and KMS.

use std::os::fd::RawFd;
use std::time::Instant;

use crate::backend::mem::MappedRegion;
use crate::backend::DomId;
use crate::displif::format::PixelFormat;
use crate::zcopy::{DmaBufFd, DumbBuffer};

pub mod convert;
pub mod frame_copy;
pub mod headless;
pub mod kms;
pub mod wayland;

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

/// A dma-buf (or a be-alloc dumb buffer) the output holds, named by the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImportId(pub u64);

/// A framebuffer the output made of an import ([`Output::add_imported_fb`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImportedFb(pub u64);

/// The layout of a guest framebuffer in its buffer (FB_ATTACH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FbLayout {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// Bytes per line.
    pub pitch: u32,
    /// Byte offset of the first pixel (`data_ofs`).
    pub offset: u32,
}

/// An imported framebuffer to scan out as is (zero-copy): the source rectangle of
/// SET_CONFIG, clipped to the connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportedFrame {
    pub fb: ImportedFb,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub fb_cookie: u64,
}

/// What to show: guest pixels in a mapping (copied/converted by the output), or a
/// framebuffer the output imported (scanned out directly, no copy).
#[derive(Clone, Copy, Debug)]
pub enum FrameSource<'a> {
    Mapped(Frame<'a>),
    Imported(ImportedFrame),
}

impl FrameSource<'_> {
    /// The guest's framebuffer cookie, echoed in the flip event.
    pub fn fb_cookie(&self) -> u64 {
        match self {
            FrameSource::Mapped(f) => f.fb_cookie,
            FrameSource::Imported(f) => f.fb_cookie,
        }
    }

    /// Size of the shown rectangle.
    pub fn size(&self) -> (u32, u32) {
        match self {
            FrameSource::Mapped(f) => (f.width, f.height),
            FrameSource::Imported(f) => (f.width, f.height),
        }
    }
}

impl<'a> From<Frame<'a>> for FrameSource<'a> {
    fn from(f: Frame<'a>) -> Self {
        FrameSource::Mapped(f)
    }
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
    #[error("not supported by this output")]
    Unsupported,
    #[error("{0}")]
    Device(#[from] std::io::Error),
    /// The driver took the PRIME import and its framebuffer but refuses to show it (a
    /// `TEST_ONLY` or real commit of it failed; nothing changed on screen). The buffer
    /// can still be shown through the copy path: the caller falls back for it alone.
    #[error("the display refuses to scan out the imported framebuffer: {0}")]
    ImportRefused(std::io::Error),
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
            OutputError::Unsupported => libc::EOPNOTSUPP,
            OutputError::Device(e) | OutputError::ImportRefused(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// Input an output received for a guest connector's picture (the Wayland seat on its
/// surface), for the vkbd device(s) of the connector's domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeatInput {
    pub conn: ConnectorId,
    /// The connector's unique-id (picks the vkbd device with the same unique-id).
    pub unique_id: String,
    pub input: Vec<crate::kbdif::device::Input>,
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
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError>;
    /// PG_FLIP: queue `frame`; its [`FlipDone`] comes from [`Output::dispatch`] later.
    /// A flip queued while one is pending replaces the queued one (latest wins), and the
    /// replaced one is still reported done.
    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError>;
    /// True while a flip on `conn` is submitted and not yet shown, so that a new one
    /// would only replace the one waiting: the caller keeps it (unread, uncopied) and
    /// hands it over once this is false again, so at most one frame per connector and
    /// refresh is copied.
    fn flip_busy(&self, _conn: ConnectorId) -> bool {
        false
    }
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
    /// Move the input received since the last call (in order) to `out`. Called by the
    /// loop after [`Output::dispatch`]; never blocks.
    fn take_input(&mut self, _out: &mut Vec<SeatInput>) {}
    /// Where `conn` is shown, for `displback status`: the KMS connector name, `headless`.
    fn target(&self, _conn: ConnectorId) -> Option<String> {
        None
    }

    // Zero-copy. An output that can scan out foreign memory implements these; the
    // defaults say "unsupported" and the caller takes the copy path.

    /// Import a guest buffer's dma-buf (KMS: `PRIME_FD_TO_HANDLE`). The output keeps its
    /// own reference until [`Output::release_import`].
    fn import_dmabuf(&mut self, _dmabuf: &DmaBufFd) -> Result<ImportId, OutputError> {
        Err(OutputError::Unsupported)
    }
    /// be-alloc: a dumb buffer of the scanout device for a `width` x `height` image of
    /// `bpp` bits per pixel, registered as an import (for framebuffers).
    fn create_dumb(
        &mut self,
        _width: u32,
        _height: u32,
        _bpp: u32,
    ) -> Result<(ImportId, Box<dyn DumbBuffer>), OutputError> {
        Err(OutputError::Unsupported)
    }
    /// FB_ATTACH on an imported buffer: make a framebuffer of it.
    fn add_imported_fb(
        &mut self,
        _import: ImportId,
        _layout: &FbLayout,
    ) -> Result<ImportedFb, OutputError> {
        Err(OutputError::Unsupported)
    }
    /// FB_DETACH: take the framebuffer off screen if shown, then remove it.
    fn remove_imported_fb(&mut self, _fb: ImportedFb) {}
    /// How to read `import`'s pixels with the CPU, for an output that must copy a
    /// buffer it shows (Wayland: the picture of a removed or refused dma-buf). Given
    /// right after [`Output::import_dmabuf`] for guest buffers; the default ignores it
    /// (KMS never copies an import).
    fn set_import_pixels(&mut self, _import: ImportId, _pixels: PixelSource) {}
    /// Drop the output's hold on an import: off screen, its framebuffers, its GEM
    /// handle (a be-alloc dumb buffer itself is freed by its [`DumbBuffer`]).
    fn release_import(&mut self, _import: ImportId) {}
}

/// Maps a guest buffer's pages for one CPU copy (its grants, read-only; unmapped when
/// the region drops). Gntdev's dma-bufs have no `mmap`, so an output cannot read an
/// import through its dma-buf on Xen: [`Output::set_import_pixels`].
pub type PixelSource = Box<dyn Fn() -> std::io::Result<MappedRegion> + Send>;

/// What the outputs need besides their kind.
#[derive(Clone, Debug, Default)]
pub struct OutputOptions {
    /// KMS: the DRM card (default: the first with connectors and CRTCs).
    pub card: Option<std::path::PathBuf>,
    /// KMS: guest connector unique-id → KMS connector name.
    pub mapping: std::collections::HashMap<String, String>,
    /// Wayland: display and surfaces (`display` already merged with `--wayland-display`).
    pub wayland: wayland::WaylandConfig,
}

/// Open the output `kind` names.
pub fn open(
    kind: crate::config::OutputKind,
    opts: &OutputOptions,
) -> anyhow::Result<Box<dyn Output + Send>> {
    let output: Box<dyn Output + Send> = match kind {
        crate::config::OutputKind::Kms => {
            Box::new(kms::Kms::open(opts.card.as_deref(), opts.mapping.clone())?)
        }
        crate::config::OutputKind::Headless => Box::new(headless::Headless::new()),
        crate::config::OutputKind::Wayland => {
            Box::new(wayland::Wayland::open(None, opts.wayland.clone())?)
        }
    };
    Ok(crate::harness_broken::wrap_output(output))
}
