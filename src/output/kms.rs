//! The KMS output (copy path): each guest connector drives one physical connector of a
//! DRM card through three XRGB8888 dumb buffers. Guest frames are copied (converted
//! when needed) into a back buffer and shown with legacy `SET_CRTC` / `PAGE_FLIP`
//! (atomic modesetting is not used). Flip-complete events arrive on the card fd.
//!
//! Versus displ_be (reference §3.5, §3.11.4): the guest size need not match a mode
//! exactly (the preferred mode is used with the image centred on black, or cropped
//! when larger), connection state is re-read at every SET_CONFIG, flips queued while
//! one is pending are merged (latest wins) instead of failing with EBUSY, and every
//! CRTC we take is restored on disable and on drop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Instant;

use anyhow::{bail, Context};
use drm::buffer::{Buffer as _, DrmFourcc};
use drm::control::dumbbuffer::DumbBuffer;
use drm::control::{
    connector, crtc, framebuffer, Device as ControlDevice, Event, Mode, ModeFlags, ModeTypeFlags,
    PageFlipFlags,
};
use drm::{ClientCapability, Device as _, DriverCapability};

use super::convert::Copier;
use super::{ConnectorId, FlipDone, Frame, Output, OutputError};
use crate::displif::format::PixelFormat;

/// Scanout buffers per active connector: front, in flight, and queued (latest wins).
const NBUF: usize = 3;

/// The KMS name of a connector: `<type>-<type id>`, e.g. `HDMI-A-1`, `Virtual-1`.
pub fn connector_name(interface: connector::Interface, type_id: u32) -> String {
    format!("{}-{}", interface.as_str(), type_id)
}

/// What [`choose_mode`] looks at in a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeInfo {
    pub width: u32,
    pub height: u32,
    pub refresh: u32,
    pub preferred: bool,
    pub interlaced: bool,
}

impl From<&Mode> for ModeInfo {
    fn from(m: &Mode) -> Self {
        let (w, h) = m.size();
        ModeInfo {
            width: u32::from(w),
            height: u32::from(h),
            refresh: m.vrefresh(),
            preferred: m.mode_type().contains(ModeTypeFlags::PREFERRED),
            interlaced: m.flags().contains(ModeFlags::INTERLACE),
        }
    }
}

/// How a guest image sits in the chosen mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The mode has the image's size.
    Exact,
    /// The mode is larger: the image is centred on black.
    Letterbox,
    /// No mode is large enough: the centre of the image is shown.
    Crop,
}

/// Pick a mode for a `width` x `height` guest image: an exact size match (preferred
/// first, then progressive, then the highest refresh); else the preferred mode if the
/// image fits in it; else the smallest mode the image fits in; else the preferred mode
/// (cropping). `None` only if there are no modes.
pub fn choose_mode(modes: &[ModeInfo], width: u32, height: u32) -> Option<(usize, Fit)> {
    let exact = modes
        .iter()
        .enumerate()
        .filter(|(_, m)| m.width == width && m.height == height)
        .max_by_key(|(i, m)| (m.preferred, !m.interlaced, m.refresh, std::cmp::Reverse(*i)));
    if let Some((i, _)) = exact {
        return Some((i, Fit::Exact));
    }
    let preferred = modes
        .iter()
        .position(|m| m.preferred)
        .or(if modes.is_empty() { None } else { Some(0) })?;
    let fits = |m: &ModeInfo| m.width >= width && m.height >= height;
    if fits(&modes[preferred]) {
        return Some((preferred, Fit::Letterbox));
    }
    let smallest = modes
        .iter()
        .enumerate()
        .filter(|(_, m)| fits(m))
        .min_by_key(|(i, m)| {
            (
                u64::from(m.width) * u64::from(m.height),
                m.interlaced,
                std::cmp::Reverse(m.refresh),
                *i,
            )
        });
    match smallest {
        Some((i, _)) => Some((i, Fit::Letterbox)),
        None => Some((preferred, Fit::Crop)),
    }
}

/// Where the visible part of a guest image goes in a scanout buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Top-left of the image in the buffer.
    pub dst_x: u32,
    pub dst_y: u32,
    /// Top-left of the shown part of the image (non-zero when cropping).
    pub src_x: u32,
    pub src_y: u32,
    /// Size of the shown part.
    pub width: u32,
    pub height: u32,
}

impl Placement {
    /// Centre a `w` x `h` image in a `mode_w` x `mode_h` buffer, cropping its centre if
    /// it is larger. With `even_x` the crop starts on an even column (YUYV pairs).
    pub fn centre(mode_w: u32, mode_h: u32, w: u32, h: u32, even_x: bool) -> Placement {
        fn axis(mode: u32, img: u32) -> (u32, u32, u32) {
            if img <= mode {
                ((mode - img) / 2, 0, img)
            } else {
                (0, (img - mode) / 2, mode)
            }
        }
        let (dst_x, mut src_x, width) = axis(mode_w, w);
        let (dst_y, src_y, height) = axis(mode_h, h);
        if even_x {
            src_x &= !1;
        }
        Placement {
            dst_x,
            dst_y,
            src_x,
            src_y,
            width,
            height,
        }
    }

    /// True if the image covers the whole `mode_w` x `mode_h` buffer.
    pub fn covers(&self, mode_w: u32, mode_h: u32) -> bool {
        self.dst_x == 0 && self.dst_y == 0 && self.width == mode_w && self.height == mode_h
    }

    /// The shown part of `frame` as a frame of its own; `None` on overflow.
    pub fn crop<'a>(&self, frame: &Frame<'a>) -> Option<Frame<'a>> {
        let bytes_pp = (frame.format.bpp() / 8) as usize;
        let off = (self.src_y as usize)
            .checked_mul(frame.pitch as usize)?
            .checked_add((self.src_x as usize).checked_mul(bytes_pp)?)?;
        Some(Frame {
            offset: frame.offset.checked_add(off)?,
            width: self.width,
            height: self.height,
            ..*frame
        })
    }

    /// Byte offset of the image's top-left in a buffer with `pitch` (4 bytes a pixel).
    pub fn dst_offset(&self, pitch: usize) -> Option<usize> {
        (self.dst_y as usize)
            .checked_mul(pitch)?
            .checked_add((self.dst_x as usize).checked_mul(4)?)
    }
}

#[derive(Debug)]
struct InFlight {
    buf: usize,
    cookies: Vec<u64>,
    /// A SET_CONFIG replaced the image while this flip was in flight: when it
    /// completes, the front buffer stays what the SET_CONFIG showed.
    superseded: bool,
}

/// Which of the [`NBUF`] buffers is scanned out, in flight, or queued, and which guest
/// cookies each flip completes. Pure state; the caller does the ioctls.
#[derive(Debug)]
pub struct FlipQueue {
    front: usize,
    in_flight: Option<InFlight>,
    queued: Option<(usize, Vec<u64>)>,
}

impl FlipQueue {
    /// Buffer `front` is being scanned out, nothing pending.
    pub fn new(front: usize) -> Self {
        FlipQueue {
            front,
            in_flight: None,
            queued: None,
        }
    }

    /// The buffer being scanned out.
    pub fn front(&self) -> usize {
        self.front
    }

    /// True while a flip is submitted and not yet complete.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The buffer to draw the next image into: neither scanned out nor in flight (the
    /// queued buffer if there is one: latest wins overwrites it).
    pub fn back(&self) -> usize {
        if let Some((b, _)) = &self.queued {
            return *b;
        }
        let busy = self.in_flight.as_ref().map(|f| f.buf);
        (0..NBUF)
            .find(|&b| b != self.front && Some(b) != busy)
            .unwrap_or((self.front + 1) % NBUF)
    }

    /// A flip of [`FlipQueue::back`] with `cookie` was drawn. Returns the buffer to
    /// submit now, or `None` if it is queued behind the flip in flight.
    pub fn push(&mut self, cookie: u64) -> Option<usize> {
        let b = self.back();
        if self.in_flight.is_none() {
            self.in_flight = Some(InFlight {
                buf: b,
                cookies: vec![cookie],
                superseded: false,
            });
            return Some(b);
        }
        match &mut self.queued {
            Some((_, cookies)) => cookies.push(cookie),
            None => self.queued = Some((b, vec![cookie])),
        }
        None
    }

    /// Submitting the flip in flight failed: drop it; returns its cookies.
    pub fn submit_failed(&mut self) -> Vec<u64> {
        self.in_flight.take().map(|f| f.cookies).unwrap_or_default()
    }

    /// The flip in flight completed: returns its cookies (oldest first) and the queued
    /// buffer to submit next, which becomes the flip in flight.
    pub fn complete(&mut self) -> (Vec<u64>, Option<usize>) {
        let Some(f) = self.in_flight.take() else {
            return (Vec::new(), None);
        };
        if !f.superseded {
            self.front = f.buf;
        }
        let next = self.queued.take().map(|(b, cookies)| {
            self.in_flight = Some(InFlight {
                buf: b,
                cookies,
                superseded: false,
            });
            b
        });
        (f.cookies, next)
    }

    /// A SET_CONFIG showed `buf` (which was [`FlipQueue::back`]) directly. The queued
    /// flip is older, so it is dropped: returns its cookies to report done now.
    pub fn modeset(&mut self, buf: usize) -> Vec<u64> {
        let queued = self.queued.take().map(|(_, c)| c).unwrap_or_default();
        if let Some(f) = &mut self.in_flight {
            f.superseded = true;
        }
        self.front = buf;
        queued
    }

    /// Forget everything; returns all outstanding cookies, oldest first.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut out = self.submit_failed();
        if let Some((_, c)) = self.queued.take() {
            out.extend(c);
        }
        out
    }
}

/// The DRM card.
struct Card(File);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl drm::Device for Card {}
impl ControlDevice for Card {}

/// A persistent CPU mapping of a dumb buffer (the drm crate's mapping borrows the
/// buffer and unmaps on drop; we keep ours for the buffer's whole life instead of
/// faulting the pages in again every frame).
struct DumbMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value alone; moving it to
// another thread moves the only way to reach it.
unsafe impl Send for DumbMap {}

impl DumbMap {
    fn new(card: &Card, buffer: &DumbBuffer) -> std::io::Result<DumbMap> {
        let mut copy = *buffer;
        let mut mapping = card.map_dumb_buffer(&mut copy)?;
        let bytes: &mut [u8] = &mut mapping;
        let len = bytes.len();
        let ptr = NonNull::new(bytes.as_mut_ptr()).ok_or(std::io::ErrorKind::InvalidData)?;
        // Keep the mmap alive: from here on our Drop unmaps it.
        std::mem::forget(mapping);
        Ok(DumbMap { ptr, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is a MAP_SHARED read/write mapping that stays mapped
        // until our Drop; `&mut self` makes this the only live reference into it. The
        // GEM object outlives the mapping (an mmap holds a reference), and the display
        // engine reading it concurrently is DMA, not a Rust access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DumbMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned (forgotten by the drm
        // crate's mapping), once; no slice into it outlives `&mut self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct ScanBuf {
    db: DumbBuffer,
    fb: framebuffer::Handle,
    map: DumbMap,
    /// The placement last drawn with: a different one first clears the borders.
    drawn: Option<Placement>,
}

/// A CRTC's state before we took it.
#[derive(Debug)]
struct SavedCrtc {
    fb: Option<framebuffer::Handle>,
    pos: (u32, u32),
    mode: Option<Mode>,
    conns: Vec<connector::Handle>,
}

struct Active {
    crtc: crtc::Handle,
    mode: Mode,
    size: (u32, u32),
    bufs: Vec<ScanBuf>,
    flips: FlipQueue,
    saved: SavedCrtc,
}

struct KmsConn {
    unique_id: String,
    phys: connector::Handle,
    name: String,
    active: Option<Active>,
}

/// The KMS [`Output`].
pub struct Kms {
    card: Card,
    path: PathBuf,
    mapping: HashMap<String, String>,
    conns: BTreeMap<ConnectorId, KmsConn>,
    copier: Copier,
    /// Flips to report at the next dispatch (superseded or disabled).
    immediate: Vec<FlipDone>,
    master: bool,
}

fn open_card(path: &Path) -> anyhow::Result<Card> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let card = Card(file);
    let dumb = card
        .get_driver_capability(DriverCapability::DumbBuffer)
        .with_context(|| format!("{}: querying DRM_CAP_DUMB_BUFFER", path.display()))?;
    if dumb == 0 {
        bail!("{}: no dumb buffer support", path.display());
    }
    let res = card
        .resource_handles()
        .with_context(|| format!("{}: not a KMS device", path.display()))?;
    if res.connectors().is_empty() || res.crtcs().is_empty() {
        bail!("{}: no connectors or CRTCs", path.display());
    }
    Ok(card)
}

/// `/dev/dri/card*` nodes, by number.
fn card_nodes() -> Vec<PathBuf> {
    let mut cards: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev/dri")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("card")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    cards.sort();
    cards.into_iter().map(|(_, p)| p).collect()
}

impl Kms {
    /// Open `card` (or the first `/dev/dri/card*` with connectors, CRTCs and dumb
    /// buffers) and become DRM master. `mapping` maps guest connector unique-ids to
    /// KMS connector names; unmapped unique-ids are taken as connector names.
    pub fn open(card: Option<&Path>, mapping: HashMap<String, String>) -> anyhow::Result<Kms> {
        let (card, path) = match card {
            Some(p) => (open_card(p)?, p.to_path_buf()),
            None => {
                let mut found = None;
                for p in card_nodes() {
                    match open_card(&p) {
                        Ok(c) => {
                            found = Some((c, p));
                            break;
                        }
                        Err(e) => tracing::debug!("skipping {}: {e:#}", p.display()),
                    }
                }
                found.context("no usable /dev/dri/card* (KMS with dumb buffers) found")?
            }
        };
        card.acquire_master_lock().with_context(|| {
            format!(
                "{}: cannot become DRM master (is a compositor running?)",
                path.display()
            )
        })?;
        // Only for completeness of what we enumerate; everything here is legacy KMS.
        let _ = card.set_client_capability(ClientCapability::UniversalPlanes, true);
        let kms = Kms {
            card,
            path,
            mapping,
            conns: BTreeMap::new(),
            copier: Copier::new(),
            immediate: Vec::new(),
            master: true,
        };
        tracing::info!(
            card = %kms.path.display(),
            connectors = ?kms.connector_names(),
            "KMS output ready (legacy modesetting, copy path)"
        );
        Ok(kms)
    }

    /// The card's connectors as (KMS name, connected?).
    pub fn connector_names(&self) -> Vec<(String, bool)> {
        let Ok(res) = self.card.resource_handles() else {
            return Vec::new();
        };
        res.connectors()
            .iter()
            .filter_map(|&h| self.card.get_connector(h, false).ok())
            .map(|i| {
                (
                    connector_name(i.interface(), i.interface_id()),
                    i.state() != connector::State::Disconnected,
                )
            })
            .collect()
    }

    fn find_connector(&self, name: &str) -> Option<connector::Handle> {
        let res = self.card.resource_handles().ok()?;
        res.connectors().iter().copied().find(|&h| {
            self.card
                .get_connector(h, false)
                .is_ok_and(|i| connector_name(i.interface(), i.interface_id()) == name)
        })
    }

    /// CRTCs our other connectors drive.
    fn used_crtcs(&self, except: ConnectorId) -> HashSet<crtc::Handle> {
        self.conns
            .iter()
            .filter(|(id, _)| **id != except)
            .filter_map(|(_, c)| c.active.as_ref().map(|a| a.crtc))
            .collect()
    }

    /// The CRTC for `info`: its encoder's current one if free, else a compatible CRTC,
    /// idle ones first.
    fn pick_crtc(&self, info: &connector::Info, except: ConnectorId) -> Option<crtc::Handle> {
        let used = self.used_crtcs(except);
        if let Some(c) = info
            .current_encoder()
            .and_then(|e| self.card.get_encoder(e).ok())
            .and_then(|e| e.crtc())
        {
            if !used.contains(&c) {
                return Some(c);
            }
        }
        let res = self.card.resource_handles().ok()?;
        let mut candidates: Vec<crtc::Handle> = Vec::new();
        for &enc in info.encoders() {
            let Ok(e) = self.card.get_encoder(enc) else {
                continue;
            };
            for c in res.filter_crtcs(e.possible_crtcs()) {
                if !used.contains(&c) && !candidates.contains(&c) {
                    candidates.push(c);
                }
            }
        }
        candidates.sort_by_key(|&c| {
            self.card
                .get_crtc(c)
                .map_or(true, |i| i.mode().is_some() || i.framebuffer().is_some())
        });
        candidates.first().copied()
    }

    fn save_crtc(&self, c: crtc::Handle) -> SavedCrtc {
        let info = self.card.get_crtc(c).ok();
        let mut conns = Vec::new();
        if let Ok(res) = self.card.resource_handles() {
            for &h in res.connectors() {
                let on_c = self
                    .card
                    .get_connector(h, false)
                    .ok()
                    .and_then(|i| i.current_encoder())
                    .and_then(|e| self.card.get_encoder(e).ok())
                    .and_then(|e| e.crtc())
                    == Some(c);
                if on_c {
                    conns.push(h);
                }
            }
        }
        SavedCrtc {
            fb: info.as_ref().and_then(|i| i.framebuffer()),
            pos: info.as_ref().map_or((0, 0), |i| i.position()),
            mode: info.as_ref().and_then(|i| i.mode()),
            conns,
        }
    }

    fn restore_crtc(card: &Card, c: crtc::Handle, saved: &SavedCrtc) {
        let restored = match (saved.fb, saved.mode) {
            (Some(fb), Some(mode)) if !saved.conns.is_empty() => {
                card.set_crtc(c, Some(fb), saved.pos, &saved.conns, Some(mode))
            }
            _ => Err(std::io::ErrorKind::NotFound.into()),
        };
        if let Err(e) = restored {
            if saved.fb.is_some() {
                tracing::debug!(
                    ?c,
                    "cannot restore the previous CRTC state ({e}); disabling"
                );
            }
            if let Err(e) = card.set_crtc(c, None, (0, 0), &[], None) {
                tracing::warn!(?c, "cannot disable CRTC: {e}");
            }
        }
    }

    fn alloc_buffers(&self, (w, h): (u32, u32)) -> std::io::Result<Vec<ScanBuf>> {
        let mut bufs = Vec::with_capacity(NBUF);
        for _ in 0..NBUF {
            match self.alloc_buffer(w, h) {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    Self::free_buffers(&self.card, bufs);
                    return Err(e);
                }
            }
        }
        Ok(bufs)
    }

    fn alloc_buffer(&self, w: u32, h: u32) -> std::io::Result<ScanBuf> {
        let db = self
            .card
            .create_dumb_buffer((w, h), DrmFourcc::Xrgb8888, 32)?;
        let fb = match self.card.add_framebuffer(&db, 24, 32) {
            Ok(fb) => fb,
            Err(e) => {
                let _ = self.card.destroy_dumb_buffer(db);
                return Err(e);
            }
        };
        match DumbMap::new(&self.card, &db) {
            Ok(map) => Ok(ScanBuf {
                db,
                fb,
                map,
                drawn: None,
            }),
            Err(e) => {
                let _ = self.card.destroy_framebuffer(fb);
                let _ = self.card.destroy_dumb_buffer(db);
                Err(e)
            }
        }
    }

    fn free_buffers(card: &Card, bufs: Vec<ScanBuf>) {
        for b in bufs {
            if let Err(e) = card.destroy_framebuffer(b.fb) {
                tracing::debug!("destroying framebuffer: {e}");
            }
            drop(b.map);
            if let Err(e) = card.destroy_dumb_buffer(b.db) {
                tracing::debug!("destroying dumb buffer: {e}");
            }
        }
    }

    /// Copy the visible part of `frame` into `buf` (a `size` XRGB8888 buffer).
    fn draw(
        copier: &mut Copier,
        buf: &mut ScanBuf,
        size: (u32, u32),
        frame: &Frame<'_>,
    ) -> Result<(), OutputError> {
        let even_x = frame.format == PixelFormat::Yuyv;
        let pl = Placement::centre(size.0, size.1, frame.width, frame.height, even_x);
        let sub = pl.crop(frame).ok_or(OutputError::Format(frame.format))?;
        let pitch = buf.db.pitch() as usize;
        let start = pl
            .dst_offset(pitch)
            .ok_or(OutputError::Format(frame.format))?;
        let covers = pl.covers(size.0, size.1);
        let bytes = buf.map.bytes();
        if buf.drawn != Some(pl) && !covers {
            bytes.fill(0);
        }
        // Invalidate first: a failed copy must not leave "drawn" claiming clean borders.
        buf.drawn = None;
        let dst = bytes
            .get_mut(start..)
            .ok_or(OutputError::Format(frame.format))?;
        copier.copy_xrgb8888(&sub, dst, pitch)?;
        buf.drawn = Some(pl);
        Ok(())
    }

    fn deactivate(&mut self, conn: ConnectorId, report: bool) {
        let Some(kc) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(mut a) = kc.active.take() else {
            return;
        };
        let busy = a.flips.busy();
        let cookies = a.flips.drain();
        if report {
            self.immediate.extend(
                cookies
                    .into_iter()
                    .map(|fb_cookie| FlipDone { conn, fb_cookie }),
            );
        }
        tracing::info!(?conn, connector = %kc.name, "display disabled");
        // Restoring waits for a flip in flight, whose event is then stale: consume it
        // so it cannot complete a later flip on the same CRTC early.
        Self::restore_crtc(&self.card, a.crtc, &a.saved);
        Self::free_buffers(&self.card, a.bufs);
        if busy {
            self.pump_events_into_immediate();
        }
    }

    /// Give every CRTC we took back its previous state, free our buffers and drop DRM
    /// master, so the console comes back. Idempotent; also done on drop.
    pub fn restore(&mut self) {
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            self.deactivate(id, true);
        }
        if self.master {
            self.master = false;
            if let Err(e) = self.card.release_master_lock() {
                tracing::debug!("dropping DRM master: {e}");
            }
        }
    }

    fn enable(&mut self, conn: ConnectorId, frame: &Frame<'_>) -> Result<(), OutputError> {
        let kc = self.conns.get(&conn).ok_or(OutputError::NotConfigured)?;
        let (phys, name) = (kc.phys, kc.name.clone());
        let info = self.card.get_connector(phys, false)?;
        if info.state() == connector::State::Disconnected || info.modes().is_empty() {
            tracing::warn!(?conn, connector = %name, "SET_CONFIG on a disconnected connector");
            return Err(OutputError::Disconnected(name));
        }
        let infos: Vec<ModeInfo> = info.modes().iter().map(ModeInfo::from).collect();
        let (idx, fit) = choose_mode(&infos, frame.width, frame.height)
            .ok_or_else(|| OutputError::Disconnected(name.clone()))?;
        let mode = info.modes()[idx];
        let size = (infos[idx].width, infos[idx].height);

        // Same mode as now: draw into the back buffer and swap it in.
        let same = self
            .conns
            .get(&conn)
            .and_then(|c| c.active.as_ref())
            .is_some_and(|a| a.mode == mode);
        if same {
            let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.active.as_mut()) else {
                return Err(OutputError::NotConfigured);
            };
            let b = a.flips.back();
            Self::draw(&mut self.copier, &mut a.bufs[b], a.size, frame)?;
            self.card
                .set_crtc(a.crtc, Some(a.bufs[b].fb), (0, 0), &[phys], Some(mode))?;
            let dropped = a.flips.modeset(b);
            self.immediate.extend(
                dropped
                    .into_iter()
                    .map(|fb_cookie| FlipDone { conn, fb_cookie }),
            );
            return Ok(());
        }

        tracing::info!(
            ?conn,
            connector = %name,
            guest = %format_args!("{}x{}", frame.width, frame.height),
            mode = %format_args!("{}x{}@{}", size.0, size.1, infos[idx].refresh),
            ?fit,
            "mode chosen"
        );
        // A different mode: new buffers on the CRTC we already hold (the old ones are
        // freed only once the new mode shows), or on a CRTC we take now.
        let old = self.conns.get_mut(&conn).and_then(|c| c.active.take());
        let (crtc, fresh_save) = match &old {
            Some(o) => (o.crtc, None),
            None => {
                let crtc = self.pick_crtc(&info, conn).ok_or_else(|| {
                    tracing::warn!(?conn, connector = %name, "no free CRTC");
                    OutputError::InUse(name.clone())
                })?;
                (crtc, Some(self.save_crtc(crtc)))
            }
        };
        let shown = match self.alloc_buffers(size) {
            Err(e) => Err(OutputError::from(e)),
            Ok(mut bufs) => {
                let r = Self::draw(&mut self.copier, &mut bufs[0], size, frame).and_then(|()| {
                    self.card
                        .set_crtc(crtc, Some(bufs[0].fb), (0, 0), &[phys], Some(mode))
                        .map_err(OutputError::from)
                });
                match r {
                    Ok(()) => Ok(bufs),
                    Err(e) => {
                        Self::free_buffers(&self.card, bufs);
                        Err(e)
                    }
                }
            }
        };
        let bufs = match shown {
            Ok(bufs) => bufs,
            Err(e) => {
                tracing::warn!(?conn, connector = %name, "SET_CONFIG failed: {e}");
                match (old, fresh_save) {
                    // Still showing the old mode: keep it.
                    (Some(o), _) => {
                        if let Some(kc) = self.conns.get_mut(&conn) {
                            kc.active = Some(o);
                        }
                    }
                    (None, Some(saved)) => Self::restore_crtc(&self.card, crtc, &saved),
                    (None, None) => {}
                }
                return Err(e);
            }
        };
        let saved = match (old, fresh_save) {
            (Some(mut o), _) => {
                let busy = o.flips.busy();
                let cookies = o.flips.drain();
                self.immediate.extend(
                    cookies
                        .into_iter()
                        .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                );
                Self::free_buffers(&self.card, o.bufs);
                if busy {
                    // Its completion event is stale now; consume it before new flips.
                    self.pump_events_into_immediate();
                }
                o.saved
            }
            (None, Some(saved)) => saved,
            (None, None) => self.save_crtc(crtc),
        };
        if let Some(kc) = self.conns.get_mut(&conn) {
            kc.active = Some(Active {
                crtc,
                mode,
                size,
                bufs,
                flips: FlipQueue::new(0),
                saved,
            });
        }
        Ok(())
    }

    /// Read pending DRM events now (outside a dispatch); what completes is reported
    /// at the next dispatch.
    fn pump_events_into_immediate(&mut self) {
        let mut done = Vec::new();
        self.read_events(&mut done);
        self.immediate.append(&mut done);
    }

    /// Read DRM events until none are left, completing flips into `done`.
    fn read_events(&mut self, done: &mut Vec<FlipDone>) {
        // The fd is non-blocking: read until the kernel has nothing more.
        for _ in 0..64 {
            let events = match self.card.receive_events() {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("reading DRM events: {e}");
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                if let Event::PageFlip(pf) = ev {
                    self.on_flip_complete(pf.crtc, done);
                }
            }
            if !any {
                break;
            }
        }
    }

    fn on_flip_complete(&mut self, crtc: crtc::Handle, done: &mut Vec<FlipDone>) {
        let Some((&conn, kc)) = self
            .conns
            .iter_mut()
            .find(|(_, c)| c.active.as_ref().is_some_and(|a| a.crtc == crtc))
        else {
            return;
        };
        let Some(a) = kc.active.as_mut() else {
            return;
        };
        let (cookies, next) = a.flips.complete();
        done.extend(
            cookies
                .into_iter()
                .map(|fb_cookie| FlipDone { conn, fb_cookie }),
        );
        if let Some(b) = next {
            if let Err(e) = self
                .card
                .page_flip(crtc, a.bufs[b].fb, PageFlipFlags::EVENT, None)
            {
                tracing::warn!(?conn, connector = %kc.name, "queued page flip failed: {e}");
                let cookies = a.flips.submit_failed();
                done.extend(
                    cookies
                        .into_iter()
                        .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                );
            }
        }
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        self.restore();
    }
}

impl Output for Kms {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError> {
        let name = self
            .mapping
            .get(unique_id)
            .cloned()
            .unwrap_or_else(|| unique_id.to_owned());
        if let Some((other, _)) = self
            .conns
            .iter()
            .find(|(id, c)| **id != conn && c.name == name)
        {
            tracing::warn!(
                ?conn,
                unique_id,
                connector = %name,
                ?other,
                "physical connector already used by another guest connector"
            );
            return Err(OutputError::InUse(name));
        }
        let Some(phys) = self.find_connector(&name) else {
            tracing::warn!(
                ?conn,
                unique_id,
                connector = %name,
                available = ?self.connector_names(),
                "no such KMS connector"
            );
            return Err(OutputError::NoConnector(name));
        };
        // One forced probe at connect time so the connection state and modes are fresh.
        let _ = self.card.get_connector(phys, true);
        self.remove_connector(conn);
        tracing::info!(?conn, unique_id, connector = %name, width, height, "guest connector added");
        self.conns.insert(
            conn,
            KmsConn {
                unique_id: unique_id.to_owned(),
                phys,
                name,
                active: None,
            },
        );
        Ok(())
    }

    fn remove_connector(&mut self, conn: ConnectorId) {
        self.deactivate(conn, false);
        self.immediate.retain(|d| d.conn != conn);
        if let Some(kc) = self.conns.remove(&conn) {
            tracing::debug!(?conn, unique_id = %kc.unique_id, "guest connector removed");
        }
    }

    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&Frame<'_>>,
    ) -> Result<(), OutputError> {
        if !self.conns.contains_key(&conn) {
            return Err(OutputError::NotConfigured);
        }
        match frame {
            Some(f) => self.enable(conn, f),
            None => {
                self.deactivate(conn, true);
                Ok(())
            }
        }
    }

    fn page_flip(&mut self, conn: ConnectorId, frame: &Frame<'_>) -> Result<(), OutputError> {
        let Some(kc) = self.conns.get_mut(&conn) else {
            return Err(OutputError::NotConfigured);
        };
        let Some(a) = kc.active.as_mut() else {
            return Err(OutputError::NotConfigured);
        };
        let b = a.flips.back();
        Self::draw(&mut self.copier, &mut a.bufs[b], a.size, frame)?;
        if let Some(b) = a.flips.push(frame.fb_cookie) {
            if let Err(e) = self
                .card
                .page_flip(a.crtc, a.bufs[b].fb, PageFlipFlags::EVENT, None)
            {
                tracing::warn!(?conn, connector = %kc.name, "page flip failed: {e}");
                a.flips.submit_failed();
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.card.0.as_raw_fd())
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.immediate.is_empty() {
            None
        } else {
            Some(Instant::now())
        }
    }

    fn dispatch(&mut self, _now: Instant, done: &mut Vec<FlipDone>) {
        done.append(&mut self.immediate);
        self.read_events(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::anonymous;

    fn m(width: u32, height: u32, refresh: u32, preferred: bool) -> ModeInfo {
        ModeInfo {
            width,
            height,
            refresh,
            preferred,
            interlaced: false,
        }
    }

    #[test]
    fn names_follow_kms() {
        use connector::Interface;
        assert_eq!(connector_name(Interface::HDMIA, 1), "HDMI-A-1");
        assert_eq!(connector_name(Interface::DisplayPort, 2), "DP-2");
        assert_eq!(connector_name(Interface::VGA, 1), "VGA-1");
        assert_eq!(connector_name(Interface::Virtual, 1), "Virtual-1");
        assert_eq!(connector_name(Interface::EmbeddedDisplayPort, 1), "eDP-1");
        assert_eq!(connector_name(Interface::DVID, 3), "DVI-D-3");
    }

    #[test]
    fn mode_choice() {
        let modes = [
            m(1920, 1080, 60, true),
            m(1280, 720, 50, false),
            m(1280, 720, 60, false),
            m(1024, 768, 75, false),
            m(800, 600, 60, false),
        ];
        assert_eq!(choose_mode(&modes, 1280, 720), Some((2, Fit::Exact)));
        assert_eq!(choose_mode(&modes, 1920, 1080), Some((0, Fit::Exact)));
        assert_eq!(choose_mode(&modes, 1000, 700), Some((0, Fit::Letterbox)));
        assert_eq!(choose_mode(&modes, 2560, 1440), Some((0, Fit::Crop)));
        assert_eq!(choose_mode(&[], 1, 1), None);
        // Preferred too small: the smallest mode that fits.
        let modes = [
            m(1024, 768, 60, true),
            m(2560, 1600, 60, false),
            m(1920, 1200, 60, false),
        ];
        assert_eq!(choose_mode(&modes, 1600, 900), Some((2, Fit::Letterbox)));
        // Exact: progressive over interlaced, preferred over refresh.
        let mut i = m(1920, 1080, 120, false);
        i.interlaced = true;
        let modes = [i, m(1920, 1080, 60, false), m(1920, 1080, 30, true)];
        assert_eq!(choose_mode(&modes, 1920, 1080), Some((2, Fit::Exact)));
        assert_eq!(choose_mode(&modes[..2], 1920, 1080), Some((1, Fit::Exact)));
        // No preferred flag: the first mode stands in.
        let modes = [m(1024, 768, 60, false), m(800, 600, 60, false)];
        assert_eq!(choose_mode(&modes, 640, 480), Some((0, Fit::Letterbox)));
    }

    #[test]
    fn placement_centres_and_crops() {
        let p = Placement::centre(1920, 1080, 1280, 720, false);
        assert_eq!((p.dst_x, p.dst_y, p.src_x, p.src_y), (320, 180, 0, 0));
        assert_eq!((p.width, p.height), (1280, 720));
        assert!(!p.covers(1920, 1080));
        assert_eq!(p.dst_offset(7680), Some(180 * 7680 + 320 * 4));
        let p = Placement::centre(1024, 768, 1024, 768, false);
        assert!(p.covers(1024, 768));
        let p = Placement::centre(800, 600, 1025, 601, true);
        assert_eq!((p.dst_x, p.dst_y, p.src_x, p.src_y), (0, 0, 112, 0));
        assert_eq!((p.width, p.height), (800, 600));
        let p = Placement::centre(800, 600, 1027, 600, false);
        assert_eq!(p.src_x, 113);
        // Odd sizes and zero never panic.
        let p = Placement::centre(1, 1, 0, u32::MAX, true);
        assert_eq!((p.width, p.height), (0, 1));
        let p = Placement::centre(0, 0, 3, 3, false);
        assert_eq!((p.width, p.height), (0, 0));
    }

    #[test]
    fn crop_frame_and_copy() {
        // A 6x4 RGB565 image shown in a 4x2 mode: the centre 4x2 block.
        let mem = anonymous(4096).unwrap();
        for y in 0..4u32 {
            for x in 0..6u32 {
                let v: u16 = if (1..5).contains(&x) && (1..3).contains(&y) {
                    0xffff
                } else {
                    0
                };
                mem.write((y * 12 + x * 2) as usize, &v.to_le_bytes())
                    .unwrap();
            }
        }
        let f = Frame {
            mem: &mem,
            offset: 0,
            width: 6,
            height: 4,
            pitch: 12,
            format: PixelFormat::Rgb565,
            fb_cookie: 0,
        };
        let p = Placement::centre(4, 2, 6, 4, false);
        let sub = p.crop(&f).unwrap();
        assert_eq!((sub.offset, sub.width, sub.height), (14, 4, 2));
        let mut dst = vec![0u8; 4 * 4 * 2];
        Copier::new().copy_xrgb8888(&sub, &mut dst, 16).unwrap();
        assert!(dst.chunks_exact(4).all(|c| c == [0xff, 0xff, 0xff, 0]));
        let huge = Placement {
            dst_x: 0,
            dst_y: 0,
            src_x: u32::MAX,
            src_y: u32::MAX,
            width: 1,
            height: 1,
        };
        let big = Frame {
            offset: usize::MAX - 4,
            pitch: u32::MAX,
            ..f
        };
        assert!(huge.crop(&big).is_none());
    }

    #[test]
    fn flip_queue_single_flips() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.back(), 1);
        assert_eq!(q.push(10), Some(1));
        assert!(q.busy());
        assert_eq!(q.front(), 0);
        assert_eq!(q.complete(), (vec![10], None));
        assert_eq!(q.front(), 1);
        assert!(!q.busy());
        assert_eq!(q.back(), 0);
        assert_eq!(q.push(11), Some(0));
        assert_eq!(q.complete(), (vec![11], None));
        assert_eq!(q.front(), 0);
        // A stray event with nothing in flight does nothing.
        assert_eq!(q.complete(), (vec![], None));
        assert_eq!(q.front(), 0);
    }

    #[test]
    fn flip_queue_latest_wins() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.push(1), Some(1));
        // Queued behind the flip in flight, into the third buffer...
        assert_eq!(q.back(), 2);
        assert_eq!(q.push(2), None);
        // ...and a newer one overwrites that same buffer.
        assert_eq!(q.back(), 2);
        assert_eq!(q.push(3), None);
        assert_eq!(q.complete(), (vec![1], Some(2)));
        assert_eq!(q.front(), 1);
        assert!(q.busy());
        // Drawing now must avoid the front (1) and the in-flight buffer (2).
        assert_eq!(q.back(), 0);
        assert_eq!(q.complete(), (vec![2, 3], None));
        assert_eq!(q.front(), 2);
    }

    #[test]
    fn flip_queue_failures_and_modeset() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.push(1), Some(1));
        assert_eq!(q.submit_failed(), vec![1]);
        assert!(!q.busy());
        assert_eq!(q.front(), 0);

        // SET_CONFIG while a flip is in flight and another queued.
        assert_eq!(q.push(2), Some(1));
        assert_eq!(q.push(3), None);
        let b = q.back();
        assert_eq!(b, 2);
        assert_eq!(q.modeset(b), vec![3]);
        assert_eq!(q.front(), 2);
        // The in-flight flip still completes, but does not take the screen back.
        assert_eq!(q.back(), 0);
        assert_eq!(q.complete(), (vec![2], None));
        assert_eq!(q.front(), 2);

        assert_eq!(q.push(4), Some(0));
        assert_eq!(q.push(5), None);
        assert_eq!(q.drain(), vec![4, 5]);
        assert!(!q.busy());
        assert_eq!(q.front(), 2);
    }

    #[test]
    fn open_without_a_card_fails_cleanly() {
        let err = Kms::open(Some(Path::new("/nonexistent/card0")), HashMap::new());
        assert!(err.is_err());
    }
}
