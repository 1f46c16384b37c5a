//! The Wayland output: each enabled guest connector is a surface of the backend
//! domain's compositor (Weston, usually), as an `ivi-application` surface (id = the
//! connector's numeric unique-id) or an `xdg-shell` toplevel (`dom<N> <unique-id>`).
//!
//! * Buffers: a guest dma-buf's own `wl_buffer` (`zwp_linux_dmabuf_v1`, [`dmabuf`]),
//!   made per framebuffer at FB_ATTACH: no copy; one the compositor cannot take is
//!   refused ([`OutputError::ImportRefused`]) and the caller copies that buffer. Else
//!   `wl_shm`, a copy of each guest frame into a slot of the connector's
//!   [`store::Store`]; the guest format is kept when the compositor offers it, else
//!   converted to XRGB8888 (as for KMS), else refused with `-EINVAL`.
//! * Flips: latest wins. A flip is done when its commit was presented
//!   (`wp_presentation` feedback, else the frame callback) *and* the compositor released
//!   the previous buffer; a surface the compositor does not draw (hidden) completes its
//!   flips after [`UNSHOWN_FLIP`] so that the guest never stalls.
//! * Seat input (`seat_input`, [`seat`]): the compositor's pointer, keyboard and touch on
//!   a guest's surface become [`Input`] for that guest, taken by the loop through
//!   [`Output::take_input`].
//! * Connection: non-blocking, read from the server loop through a stable epoll fd
//!   ([`Output::event_fd`]) that holds the socket of the current connection. With no
//!   compositor (not started yet, died, protocol error) the output retries with
//!   backoff; meanwhile connectors exist and flips complete on a 60 Hz timer, like a
//!   disabled KMS connector, and the last frame is kept to show after a reconnect.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use tracing::{info, warn};
use wayland_client::backend::WaylandError;
use wayland_client::protocol::wl_buffer::WlBuffer;
use wayland_client::protocol::wl_shm;
use wayland_client::protocol::wl_shm_pool::WlShmPool;
use wayland_client::protocol::wl_surface::WlSurface;
use wayland_client::{Connection, EventQueue, Proxy};
use wayland_protocols::wp::viewporter::client::wp_viewport::WpViewport;
use wayland_protocols::xdg::shell::client::{xdg_surface::XdgSurface, xdg_toplevel::XdgToplevel};

use super::convert::{row_bytes, Copier};
use super::headless::PERIOD_60HZ;
use super::{
    ConnectorId, FbLayout, FlipDone, Frame, FrameSource, ImportId, ImportedFb, ImportedFrame,
    Output, OutputError, SeatInput,
};
use crate::displif::format::{fourcc, PixelFormat};
use crate::warn_limited;
use crate::zcopy::DmaBufFd;

pub mod dmabuf;
pub mod proto;
pub mod seat;
pub mod store;

use crate::kbdif::device::{Input, MAX_CONTACTS};
use proto::{BufData, CbData, Ev, FeedbackData, Session};
use seat::{Mapping, Seat, SeatStats};
use store::{Geometry, Store, SLOTS};

/// A committed flip the compositor neither presents nor discards in this long (a hidden
/// or minimised surface gets no frame callbacks) completes anyway.
pub const UNSHOWN_FLIP: Duration = Duration::from_millis(100);
/// First retry after a failed connection; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection that has not bound its globals in this long is dropped and retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// wl_shm format codes of the two formats every compositor supports.
pub const SHM_ARGB8888: u32 = 0;
pub const SHM_XRGB8888: u32 = 1;

/// Which shell a connector's surface uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShellChoice {
    /// `ivi-application` when the compositor offers it and the surface has an id (a
    /// numeric unique-id or `ivi_id`), else `xdg-shell`.
    #[default]
    Auto,
    /// Always an `xdg-shell` toplevel.
    Xdg,
    /// `ivi-application` (falls back to `xdg-shell`, with a warning, if not offered).
    Ivi,
}

/// Per-connector surface options (`[wayland.surfaces."<unique-id>"]`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SurfaceConfig {
    pub shell: Option<ShellChoice>,
    /// The ivi surface id (default: the unique-id, if numeric).
    pub ivi_id: Option<u32>,
    /// Ask for a fullscreen toplevel (xdg-shell).
    pub fullscreen: Option<bool>,
    /// Toplevel title (default `dom<N> <unique-id>`).
    pub title: Option<String>,
}

/// The `[wayland]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WaylandConfig {
    /// Socket name (relative to `$XDG_RUNTIME_DIR`) or absolute path; default
    /// `$WAYLAND_DISPLAY`, else `wayland-0`.
    pub display: Option<String>,
    /// Default shell of every surface.
    pub shell: ShellChoice,
    /// Default for `fullscreen`.
    pub fullscreen: bool,
    /// Per guest connector unique-id.
    pub surfaces: HashMap<String, SurfaceConfig>,
    /// Bind the compositor's `wl_seat` and send its pointer, keyboard and touch input
    /// on a guest's surface to that guest's vkbd device(s) (`--wayland-seat-input`).
    pub seat_input: bool,
}

/// The socket path for a display name: absolute as is, else under `runtime_dir`.
pub fn socket_path(
    display: Option<&str>,
    env_display: Option<&str>,
    runtime_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    let name = display
        .or(env_display)
        .filter(|s| !s.is_empty())
        .unwrap_or("wayland-0");
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match runtime_dir {
        Some(d) => Ok(d.join(name)),
        None => Err(format!(
            "XDG_RUNTIME_DIR is not set (needed for the Wayland display {name:?})"
        )),
    }
}

/// How a guest format goes into a `wl_shm` buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmChoice {
    pub shm_format: u32,
    /// Copied unchanged (true) or converted to XRGB8888.
    pub same: bool,
}

/// The `wl_shm` format for guest `format` among the compositor's `offered`: the same
/// layout if offered (alpha formats shown as their X variant: a guest's display has no
/// transparency), else XRGB8888 by conversion; `None` if not even that is offered.
pub fn choose_format(format: PixelFormat, offered: &[u32]) -> Option<ShmChoice> {
    let same = match format {
        PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => SHM_XRGB8888,
        PixelFormat::Rgb565 => fourcc(b"RG16"),
        PixelFormat::Rgb888 => fourcc(b"RG24"),
        PixelFormat::Xrgb4444 | PixelFormat::Argb4444 => fourcc(b"XR12"),
        PixelFormat::Xrgb1555 | PixelFormat::Argb1555 => fourcc(b"XR15"),
        PixelFormat::Yuyv => fourcc(b"YUYV"),
    };
    if offered.contains(&same) {
        return Some(ShmChoice {
            shm_format: same,
            same: true,
        });
    }
    offered.contains(&SHM_XRGB8888).then_some(ShmChoice {
        shm_format: SHM_XRGB8888,
        same: false,
    })
}

/// Buffer geometry for a `width` x `height` frame of `format` stored as `choice`.
fn geometry(format: PixelFormat, width: u32, height: u32, choice: ShmChoice) -> Option<Geometry> {
    let row = if choice.same {
        row_bytes(format, width)?
    } else {
        (width as usize).checked_mul(4)?
    };
    let stride = u32::try_from(row.checked_add(3)? & !3).ok()?;
    if width == 0 || height == 0 || i32::try_from(width).is_err() || i32::try_from(height).is_err()
    {
        return None;
    }
    Some(Geometry {
        width,
        height,
        stride,
        shm_format: choice.shm_format,
    })
}

/// Set the X bits of the `width` x `height` rectangle at the start of `buf` (rows `pitch`
/// apart) for the wl_shm formats that have them. X means "ignored", but compositors
/// compose with it (Weston's pixman renderer carries it into its framebuffer as alpha,
/// and guests and our conversions leave it 0): a guest display is always opaque.
pub fn force_opaque(buf: &mut [u8], pitch: usize, width: usize, height: usize, shm_format: u32) {
    let (bpp, byte, bits) = match shm_format {
        SHM_XRGB8888 => (4, 3, 0xff),
        f if f == fourcc(b"XR12") => (2, 1, 0xf0),
        f if f == fourcc(b"XR15") => (2, 1, 0x80),
        _ => return,
    };
    for y in 0..height {
        let Some(row) = buf.get_mut(y * pitch..y * pitch + width * bpp) else {
            return;
        };
        for px in row.chunks_exact_mut(bpp) {
            px[byte] |= bits;
        }
    }
}

/// The largest size of `bw` x `bh`'s aspect that fits in `w` x `h`.
pub fn fit(bw: u32, bh: u32, w: i32, h: i32) -> (i32, i32) {
    if w <= 0 || h <= 0 || bw == 0 || bh == 0 {
        return (bw as i32, bh as i32);
    }
    let (bw, bh, w, h) = (u64::from(bw), u64::from(bh), w as u64, h as u64);
    if w * bh <= h * bw {
        (w as i32, ((bh * w) / bw).max(1) as i32)
    } else {
        (((bw * h) / bh).max(1) as i32, h as i32)
    }
}

/// A picture to attach: a slot of the connector's `wl_shm` store (a copy), or the
/// `wl_buffer` of a dma-buf framebuffer (zero-copy, [`DmaFb`] by key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pic {
    Shm(usize),
    Dma(u64),
}

/// How far the `wl_buffer` of a dma-buf framebuffer is on the current connection.
enum DmaState {
    /// Not asked for on this connection (no compositor yet, or a new connection).
    Unsent,
    /// `create` sent at this instant, no answer yet.
    Pending(Instant),
    Ready(WlBuffer),
    /// The compositor cannot import it (`failed`, no linux-dmabuf, format not offered):
    /// the buffer is refused as an import and the caller copies it.
    Failed(&'static str),
}

/// A framebuffer on a guest dma-buf ([`Output::add_imported_fb`]).
struct DmaFb {
    import: ImportId,
    layout: FbLayout,
    state: DmaState,
    /// The compositor holds the `wl_buffer` (attached, not released yet).
    held: bool,
    /// The connector it was last committed on.
    conn: Option<ConnectorId>,
}

/// A flip of a dma-buf whose buffer creation the compositor has not answered yet (it is
/// asked for at FB_ATTACH, so normally answered long before the first flip of it) is
/// deferred, never waited for: it goes out once the answer is in, or as a copy when the
/// answer is `failed` or has not come this long after the creation was asked for.
pub const DMABUF_CREATE_WAIT: Duration = Duration::from_millis(200);

struct Inflight {
    slot: Pic,
    seq: u64,
    cookies: Vec<u64>,
    /// The picture that was on screen before (must be released before the flip is done).
    prev: Option<Pic>,
    shown: bool,
    deadline: Instant,
}

struct Waiting {
    slot: Pic,
    cookies: Vec<u64>,
}

/// A flip of a dma-buf whose `wl_buffer` the compositor has not answered yet: it is
/// the connector's next flip (like one submitted: a later flip queues behind it, it is
/// never superseded), committed once the buffer is created, or copied if the creation
/// fails or is not answered by `deadline` (checked from the loop's timer).
struct Deferred {
    key: u64,
    cookies: Vec<u64>,
    deadline: Instant,
}

/// A flip with no surface to show it on: completes at the next 60 Hz tick.
struct Simulated {
    slot: Pic,
    cookies: Vec<u64>,
    due: Instant,
}

struct Conn {
    unique_id: String,
    enabled: bool,
    store: Option<Store>,
    /// The picture on screen (or to show once a surface is back).
    front: Option<Pic>,
    inflight: Option<Inflight>,
    /// A flip waiting for its dma-buf `wl_buffer` (then `inflight` is `None`).
    deferred: Option<Deferred>,
    /// Flip waiting for `inflight` (or `deferred`) to finish (latest wins).
    queued: Option<Waiting>,
    sim: Option<Simulated>,
    /// 60 Hz phase of simulated flips.
    last_tick: Option<Instant>,
    /// The picture last committed to the current surface.
    committed: Option<Pic>,
    /// Size of the guest frame last rendered (inside the buffer when letterboxed).
    frame_size: Option<(u32, u32)>,
}

impl Conn {
    fn busy_slot(&self, i: usize) -> bool {
        let i = Pic::Shm(i);
        self.front == Some(i)
            || self.inflight.as_ref().is_some_and(|f| f.slot == i)
            || self.queued.as_ref().is_some_and(|q| q.slot == i)
            || self.sim.as_ref().is_some_and(|s| s.slot == i)
            || matches!(i, Pic::Shm(n) if self.store.as_ref().is_some_and(|s| s.held[n]))
    }
}

enum Role {
    Xdg(XdgSurface, XdgToplevel),
    Ivi(proto::ivi::ivi_surface::IviSurface),
}

struct Surf {
    wl: WlSurface,
    role: Role,
    viewport: Option<WpViewport>,
    configured: bool,
    /// The compositor's suggested size (0 = ours).
    size: (i32, i32),
    /// Pool and buffers of store generation `.0`.
    pool: Option<(u64, WlShmPool, Vec<Option<WlBuffer>>)>,
    next_seq: u64,
    /// Buffer size the opaque region was set for.
    opaque: Option<(u32, u32)>,
    /// The viewport destination last set (None: the buffer's own size).
    dest: Option<(i32, i32)>,
}

impl Surf {
    fn destroy(self) {
        if let Some((_, pool, bufs)) = self.pool {
            for b in bufs.into_iter().flatten() {
                b.destroy();
            }
            pool.destroy();
        }
        if let Some(v) = self.viewport {
            v.destroy();
        }
        match self.role {
            Role::Xdg(s, t) => {
                t.destroy();
                s.destroy();
            }
            Role::Ivi(i) => i.destroy(),
        }
        self.wl.destroy();
    }
}

struct Up {
    conn: Connection,
    queue: EventQueue<Session>,
    st: Session,
    /// Globals bound and formats known.
    ready: bool,
    sync2_sent: bool,
    started: Instant,
    surfaces: BTreeMap<ConnectorId, Surf>,
}

enum Link {
    Down { retry_at: Instant },
    Up(Box<Up>),
}

/// What happened to the connection so far (for `displback status`, logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaylandStats {
    /// Connections that became ready.
    pub connects: u64,
    /// Connections lost (closed, protocol error, I/O error, setup failure).
    pub disconnects: u64,
    /// Flips completed by presentation feedback or frame callback.
    pub presented: u64,
    /// Flips the compositor discarded or never showed within [`UNSHOWN_FLIP`].
    pub unshown: u64,
    /// Flips completed without a surface (no compositor, surface not configured yet).
    pub simulated: u64,
    /// Surfaces created as `ivi-application` surfaces.
    pub ivi_surfaces: u64,
    /// Surfaces created as `xdg-shell` toplevels.
    pub xdg_surfaces: u64,
    /// Frames handed over as a guest dma-buf's own `wl_buffer` (no copy).
    pub zero_copy: u64,
    /// Frames copied (or converted) into a `wl_shm` buffer.
    pub copied: u64,
    /// dma-buf framebuffers the compositor could not import (refused: copied instead).
    pub dmabuf_refused: u64,
}

/// The Wayland [`Output`].
pub struct Wayland {
    socket: PathBuf,
    cfg: WaylandConfig,
    conns: BTreeMap<ConnectorId, Conn>,
    link: Link,
    /// Wait before the next connection attempt after a failure.
    backoff: Duration,
    poll: Poll,
    events: Events,
    /// Wakes `poll` (and so the server loop) from the connection thread.
    waker: std::sync::Arc<mio::Waker>,
    /// A connection attempt in progress on its thread.
    connecting: Option<Connecting>,
    copier: Copier,
    scratch: Vec<u8>,
    /// The geometry `scratch` was last cleared for.
    scratch_geo: Option<Geometry>,
    immediate: Vec<FlipDone>,
    next_gen: u64,
    /// The connection failed outside `dispatch`: drop it at the next dispatch.
    broken: Option<String>,
    stats: WaylandStats,
    /// A copy of `stats` other threads can read (updated at each dispatch).
    shared: std::sync::Arc<std::sync::Mutex<WaylandStats>>,
    /// Seat focus and contacts (`seat_input`).
    seat: Seat,
    /// Seat input translated, not yet labelled with its connector's unique-id.
    seat_out: Vec<(ConnectorId, Input)>,
    /// Seat input for [`Output::take_input`].
    seat_ready: Vec<SeatInput>,
    /// Our own reference to each imported guest dma-buf.
    imports: HashMap<ImportId, OwnedFd>,
    next_import: u64,
    /// Framebuffers on imported dma-bufs, by [`ImportedFb`] number (= [`DmabufKey`]).
    dfbs: BTreeMap<u64, DmaFb>,
    next_dfb: u64,
    /// `wl_buffer`s of removed dma-buf framebuffers the compositor still holds, with
    /// the connector they were last on: destroyed when released, never before.
    doomed: Vec<(u64, Option<ConnectorId>, WlBuffer)>,
    /// [`DMABUF_CREATE_WAIT`] (tests lengthen it).
    create_wait: Duration,
}

const TOK_WL: Token = Token(0);
const TOK_CONNECT: Token = Token(1);

struct Connecting {
    rx: std::sync::mpsc::Receiver<io::Result<UnixStream>>,
    since: Instant,
    warned: bool,
}

impl Wayland {
    /// A Wayland output for `display` (or `cfg.display`, `$WAYLAND_DISPLAY`, `wayland-0`)
    /// under `$XDG_RUNTIME_DIR`. Connects at the first dispatch, not here: a compositor
    /// that is not up yet is not an error.
    pub fn open(display: Option<&str>, cfg: WaylandConfig) -> anyhow::Result<Self> {
        let env_display = std::env::var("WAYLAND_DISPLAY").ok();
        let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        let socket = socket_path(
            display.or(cfg.display.as_deref()),
            env_display.as_deref(),
            runtime.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        Ok(Self::with_socket(socket, cfg)?)
    }

    /// A Wayland output for the compositor socket at `socket`.
    pub fn with_socket(socket: PathBuf, cfg: WaylandConfig) -> io::Result<Self> {
        info!(socket = %socket.display(), "wayland output");
        let poll = Poll::new()?;
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), TOK_CONNECT)?);
        Ok(Wayland {
            socket,
            cfg,
            conns: BTreeMap::new(),
            link: Link::Down {
                retry_at: Instant::now(),
            },
            backoff: MIN_BACKOFF,
            poll,
            events: Events::with_capacity(4),
            waker,
            connecting: None,
            copier: Copier::new(),
            scratch: Vec::new(),
            scratch_geo: None,
            immediate: Vec::new(),
            next_gen: 1,
            broken: None,
            stats: WaylandStats::default(),
            shared: Default::default(),
            seat: Seat::new(MAX_CONTACTS as u8),
            seat_out: Vec::new(),
            seat_ready: Vec::new(),
            imports: HashMap::new(),
            next_import: 1,
            dfbs: BTreeMap::new(),
            next_dfb: 1,
            doomed: Vec::new(),
            create_wait: DMABUF_CREATE_WAIT,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> WaylandStats {
        self.stats
    }

    /// A handle on the counters that other threads can read (after each dispatch).
    pub fn stats_handle(&self) -> std::sync::Arc<std::sync::Mutex<WaylandStats>> {
        self.shared.clone()
    }

    /// Seat input counters (dropped events).
    pub fn seat_stats(&self) -> SeatStats {
        self.seat.stats
    }

    /// Where the guest image of `id` lies on its surface (None: no shown surface).
    fn mapping(&self, id: ConnectorId) -> Option<Mapping> {
        let Link::Up(up) = &self.link else {
            return None;
        };
        let s = up.surfaces.get(&id).filter(|s| s.configured)?;
        let c = self.conns.get(&id).filter(|c| c.enabled)?;
        let (fw, fh) = c.frame_size?;
        // A dma-buf buffer is the frame itself; a wl_shm one may be letterboxed.
        let (gw, gh) = match c.front {
            Some(Pic::Dma(_)) => (fw, fh),
            _ => {
                let geo = c.store.as_ref()?.geo;
                (geo.width, geo.height)
            }
        };
        if let Some((dw, dh)) = s.dest {
            // Scaled by the viewport: the image fills the surface.
            return Some(Mapping {
                x0: 0.0,
                y0: 0.0,
                width: f64::from(dw),
                height: f64::from(dh),
            });
        }
        // The frame centred in the buffer (letterboxed, unscaled), as `render` puts it.
        Some(Mapping {
            x0: f64::from(gw.saturating_sub(fw) / 2),
            y0: f64::from(gh.saturating_sub(fh) / 2),
            width: f64::from(fw),
            height: f64::from(fh),
        })
    }

    /// Label translated seat input with its connector's unique-id (batched per connector),
    /// while the connector is still known.
    fn flush_seat(&mut self) {
        for (conn, input) in self.seat_out.drain(..) {
            match self.seat_ready.last_mut() {
                Some(last) if last.conn == conn => last.input.push(input),
                _ => self.seat_ready.push(SeatInput {
                    conn,
                    unique_id: self
                        .conns
                        .get(&conn)
                        .map(|c| c.unique_id.clone())
                        .unwrap_or_default(),
                    input: vec![input],
                }),
            }
        }
    }

    /// Translate what the seat said since the last dispatch.
    fn handle_seat(&mut self) {
        let evs = match &mut self.link {
            Link::Up(up) => std::mem::take(&mut up.st.seat_events),
            Link::Down { .. } => return,
        };
        if evs.is_empty() {
            return;
        }
        let maps: HashMap<ConnectorId, Mapping> = self
            .conns
            .keys()
            .filter_map(|id| self.mapping(*id).map(|m| (*id, m)))
            .collect();
        let before = self.seat.stats;
        for ev in evs {
            self.seat
                .handle(ev, |c| maps.get(&c).copied(), &mut self.seat_out);
        }
        let after = self.seat.stats;
        if after != before {
            warn_limited!(
                unknown = after.unknown,
                touch_dropped = after.touch_dropped,
                bad_code = after.bad_code,
                "wayland seat: input dropped (not on a guest's surface, or too many contacts)"
            );
        }
    }

    /// True while connected to a compositor with globals bound.
    pub fn connected(&self) -> bool {
        matches!(&self.link, Link::Up(up) if up.ready)
    }

    /// True once the connector's surface is configured (shown by the compositor).
    pub fn surface_ready(&self, conn: ConnectorId) -> bool {
        match &self.link {
            Link::Up(up) => up.surfaces.get(&conn).is_some_and(|s| s.configured),
            Link::Down { .. } => false,
        }
    }

    /// The pixels of the slot on screen for `conn` (tests).
    pub fn front_pixels(&self, conn: ConnectorId) -> Option<(Geometry, Vec<u8>)> {
        let c = self.conns.get(&conn)?;
        let s = c.store.as_ref()?;
        let Some(Pic::Shm(slot)) = c.front else {
            return None;
        };
        Some((s.geo, s.read(slot).ok()?))
    }

    fn offered_formats(&self) -> Vec<u32> {
        match &self.link {
            Link::Up(up) if up.ready => up.st.shm_formats.clone(),
            // Unknown yet: every compositor has XRGB8888.
            _ => vec![SHM_XRGB8888],
        }
    }

    /// Copy `frame` into a free slot of `conn`'s store (replacing the store if the
    /// geometry or format changed); returns the slot.
    fn render(&mut self, id: ConnectorId, frame: &Frame<'_>) -> Result<usize, OutputError> {
        let offered = self.offered_formats();
        let choice = choose_format(frame.format, &offered).ok_or_else(|| {
            warn_limited!(?id, format = ?frame.format, "compositor offers neither the format nor XRGB8888");
            OutputError::Format(frame.format)
        })?;
        let (bw, bh) = self.buffer_size(id, frame, choice);
        let geo =
            geometry(frame.format, bw, bh, choice).ok_or(OutputError::Format(frame.format))?;
        // Letterboxed: the frame centred, the rest black (zero in every format but YUYV,
        // which is never letterboxed).
        let bpp = if choice.same {
            (frame.format.bpp() / 8) as usize
        } else {
            4
        };
        let origin = ((bh - frame.height) / 2) as usize * geo.stride as usize
            + ((bw - frame.width) / 2) as usize * bpp;
        let Some(c) = self.conns.get_mut(&id) else {
            return Err(OutputError::NotConfigured);
        };
        if c.store.as_ref().is_none_or(|s| s.geo != geo) {
            let gen = self.next_gen;
            self.next_gen += 1;
            c.store = Some(Store::new(geo, gen)?);
            c.committed = None;
            // The old slots are gone: what referred to them now refers to nothing.
            if matches!(c.front, Some(Pic::Shm(_))) {
                c.front = None;
            }
            if let Some(f) = c
                .inflight
                .as_mut()
                .filter(|f| matches!(f.prev, Some(Pic::Shm(_))))
            {
                f.prev = None;
            }
            if let Some(d) = c.deferred.take() {
                self.immediate
                    .extend(d.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            for w in c.queued.take().into_iter() {
                self.immediate
                    .extend(w.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            if let Some(s) = c.sim.take() {
                self.immediate
                    .extend(s.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            if let Some(f) = c.inflight.take() {
                self.immediate
                    .extend(f.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
        }
        let slot = (0..SLOTS)
            .find(|&i| !c.busy_slot(i))
            .or_else(|| shm_slot(c.queued.as_ref().map(|q| q.slot)))
            .or_else(|| shm_slot(c.sim.as_ref().map(|s| s.slot)))
            .or_else(|| {
                // Every slot held by a compositor that stopped releasing: reuse one it
                // already replaced on screen (it will not show it again).
                let inflight = c.inflight.as_ref().map(|f| f.slot);
                let spare = (0..SLOTS)
                    .find(|&i| c.front != Some(Pic::Shm(i)) && inflight != Some(Pic::Shm(i)));
                warn_limited!(
                    ?id,
                    "wayland: compositor holds every buffer; reusing a replaced one"
                );
                spare
            })
            .ok_or_else(|| OutputError::Device(io::Error::from_raw_os_error(libc::EBUSY)))?;
        let Some(store) = c.store.as_ref() else {
            return Err(OutputError::NotConfigured);
        };
        let n = geo.slot_bytes().unwrap_or(0);
        if self.scratch_geo != Some(geo) {
            // Only the frame's rectangle is written per frame: the border must be black.
            self.scratch.clear();
            self.scratch.resize(n, 0);
            // Opaque black (a letterbox border).
            force_opaque(
                &mut self.scratch,
                geo.stride as usize,
                bw as usize,
                bh as usize,
                geo.shm_format,
            );
            self.scratch_geo = Some(geo);
        }
        let pitch = geo.stride as usize;
        let dst = self
            .scratch
            .get_mut(origin..)
            .ok_or(OutputError::Format(frame.format))?;
        if choice.same {
            self.copier.copy_same(frame, dst, pitch)?;
        } else {
            self.copier.convert(frame, dst, pitch)?;
        }
        force_opaque(
            dst,
            pitch,
            frame.width as usize,
            frame.height as usize,
            geo.shm_format,
        );
        store.write(slot, &self.scratch)?;
        c.frame_size = Some((frame.width, frame.height));
        Ok(slot)
    }

    /// The buffer size for `frame`: the frame's own, or the surface's configured size
    /// when the compositor has no `wp_viewporter` and asked for a larger surface (the
    /// frame is then letterboxed in the buffer, unscaled).
    fn buffer_size(&self, id: ConnectorId, frame: &Frame<'_>, choice: ShmChoice) -> (u32, u32) {
        let own = (frame.width, frame.height);
        let Link::Up(up) = &self.link else {
            return own;
        };
        let Some(s) = up.surfaces.get(&id) else {
            return own;
        };
        let (w, h) = s.size;
        let letterbox = s.configured
            && s.viewport.is_none()
            && !(choice.same && frame.format == PixelFormat::Yuyv)
            && w > 0
            && h > 0
            && (w as u32, h as u32) != own
            && w as u32 >= frame.width
            && h as u32 >= frame.height;
        if letterbox {
            (w as u32, h as u32)
        } else {
            own
        }
    }

    /// Report flips at the next dispatch.
    fn complete(&mut self, conn: ConnectorId, cookies: Vec<u64>) {
        self.immediate.extend(
            cookies
                .into_iter()
                .map(|fb_cookie| FlipDone { conn, fb_cookie }),
        );
    }

    /// Every pending flip of `conn` completes now (a config or disable superseded them).
    fn flush_pending(&mut self, id: ConnectorId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut cookies = Vec::new();
        if let Some(f) = c.inflight.take() {
            cookies.extend(f.cookies);
        }
        if let Some(d) = c.deferred.take() {
            cookies.extend(d.cookies);
        }
        if let Some(q) = c.queued.take() {
            cookies.extend(q.cookies);
        }
        if let Some(s) = c.sim.take() {
            cookies.extend(s.cookies);
        }
        self.complete(id, cookies);
    }

    /// The first 60 Hz tick after `now` on `conn`'s phase.
    fn next_tick(c: &Conn, now: Instant) -> Instant {
        let start = c.last_tick.unwrap_or(now);
        let period = PERIOD_60HZ.as_nanos();
        let elapsed = now.saturating_duration_since(start).as_nanos();
        let k = elapsed / period + 1;
        start + Duration::from_nanos(u64::try_from(k * period).unwrap_or(u64::MAX))
    }

    // ---- connection ----

    /// Start connecting on a helper thread: `connect(2)` on a Unix socket blocks while
    /// the listener's backlog is full (a compositor that listens but never accepts), and
    /// the shared loop must not. The thread wakes the loop through our epoll fd.
    fn start_connect(&mut self, now: Instant) {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.socket.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("wayland-connect".into())
            .spawn(move || {
                let _ = tx.send(UnixStream::connect(&path));
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => {
                self.connecting = Some(Connecting {
                    rx,
                    since: now,
                    warned: false,
                })
            }
            Err(e) => self.retry_later(now, format!("starting a connection thread: {e}")),
        }
    }

    /// Check on the connection thread.
    fn poll_connect(&mut self, now: Instant) {
        let Some(c) = self.connecting.as_mut() else {
            return;
        };
        match c.rx.try_recv() {
            Ok(Ok(stream)) => {
                self.connecting = None;
                self.try_connect(now, stream);
            }
            Ok(Err(e)) => {
                self.connecting = None;
                self.retry_later(now, format!("connecting to {}: {e}", self.socket.display()));
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if !c.warned && now.saturating_duration_since(c.since) > SETUP_TIMEOUT {
                    c.warned = true;
                    warn!(socket = %self.socket.display(), "wayland: connecting blocks (the compositor does not accept); still waiting");
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.connecting = None;
                self.retry_later(now, "connection thread ended without a result".into());
            }
        }
    }

    fn try_connect(&mut self, now: Instant, stream: UnixStream) {
        let fd = stream.as_raw_fd();
        let conn = match Connection::from_socket(stream) {
            Ok(c) => c,
            Err(e) => {
                self.retry_later(now, format!("wayland handshake: {e}"));
                return;
            }
        };
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), TOK_WL, Interest::READABLE)
        {
            self.retry_later(now, format!("polling the wayland socket: {e}"));
            return;
        }
        let queue = conn.new_event_queue::<Session>();
        let qh = queue.handle();
        let display = conn.display();
        display.get_registry(&qh, ());
        display.sync(&qh, CbData::Sync(1));
        let up = Box::new(Up {
            conn,
            queue,
            st: Session {
                seat_input: self.cfg.seat_input,
                ..Session::default()
            },
            ready: false,
            sync2_sent: false,
            started: now,
            surfaces: BTreeMap::new(),
        });
        if let Err(e) = up.conn.flush() {
            self.link = Link::Up(up);
            self.disconnect(now, format!("wayland flush: {e}"));
            return;
        }
        self.link = Link::Up(up);
    }

    fn retry_later(&mut self, now: Instant, why: String) {
        let backoff = self.backoff;
        warn_limited!(retry_ms = backoff.as_millis() as u64, "wayland: {why}");
        self.backoff = (backoff * 2).min(MAX_BACKOFF);
        self.link = Link::Down {
            retry_at: now + backoff,
        };
    }

    /// Drop the connection: flips in flight complete now, the last frame stays to show
    /// after the reconnect, nothing is held by a compositor any more.
    fn disconnect(&mut self, now: Instant, why: String) {
        if let Link::Up(up) = &self.link {
            let fd = up.conn.backend().poll_fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            if up.ready {
                self.stats.disconnects += 1;
            }
            warn!(event = "wayland_disconnected", reason = %why, "wayland compositor connection lost; retrying");
        }
        self.seat.forget_all(&mut self.seat_out);
        // The wl_buffers died with the connection: asked for again on the next one.
        self.doomed.clear();
        for d in self.dfbs.values_mut() {
            d.state = DmaState::Unsent;
            d.held = false;
        }
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if let Some(s) = c.store.as_mut() {
                s.forget_held();
            }
            c.committed = None;
            let mut cookies = Vec::new();
            if let Some(f) = c.inflight.take() {
                c.front = Some(f.slot);
                cookies.extend(f.cookies);
            }
            if let Some(d) = c.deferred.take() {
                c.front = Some(Pic::Dma(d.key));
                cookies.extend(d.cookies);
            }
            if let Some(q) = c.queued.take() {
                c.front = Some(q.slot);
                cookies.extend(q.cookies);
            }
            self.complete(id, cookies);
        }
        self.retry_later(now, why);
    }

    /// Read and handle everything the compositor sent; `Err` = the connection is unusable.
    fn pump(up: &mut Up) -> Result<(), String> {
        loop {
            up.queue
                .dispatch_pending(&mut up.st)
                .map_err(|e| format!("wayland dispatch: {e}"))?;
            match up.conn.flush() {
                Ok(()) => {}
                Err(WaylandError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("wayland flush: {e}")),
            }
            let Some(guard) = up.queue.prepare_read() else {
                continue;
            };
            match guard.read() {
                Ok(_) => continue,
                Err(WaylandError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let proto = up.conn.protocol_error();
                    return Err(match proto {
                        Some(p) => format!("wayland protocol error: {p}"),
                        None => format!("wayland read: {e}"),
                    });
                }
            }
        }
        if let Some(p) = up.conn.protocol_error() {
            return Err(format!("wayland protocol error: {p}"));
        }
        Ok(())
    }

    /// Setup: after the first sync the globals are known (bound as announced); check
    /// them and sync again, after which the `wl_shm` formats are known too.
    fn advance_setup(&mut self, now: Instant) -> Result<(), String> {
        let Link::Up(up) = &mut self.link else {
            return Ok(());
        };
        if up.ready {
            return Ok(());
        }
        if up.st.syncs_done >= 2 {
            up.ready = true;
            self.backoff = MIN_BACKOFF;
            self.stats.connects += 1;
            let mut formats = up.st.shm_formats.clone();
            formats.sort_unstable();
            info!(
                event = "wayland_connected",
                socket = %self.socket.display(),
                globals = %up.st.globals.names(),
                shm_formats = ?formats,
                // zwp_linux_dmabuf_v1 (format, modifier) pairs (0 without the global).
                dmabuf_pairs = up.st.dmabuf_formats.len(),
                "wayland compositor connected"
            );
            return Ok(());
        }
        if up.st.syncs_done == 1 && !up.sync2_sent {
            let g = &up.st.globals;
            if g.compositor.is_none() || g.shm.is_none() {
                return Err(format!(
                    "compositor lacks wl_compositor or wl_shm ({})",
                    g.names()
                ));
            }
            if g.wm_base.is_none() && g.ivi.is_none() {
                return Err(format!("compositor offers no shell ({})", g.names()));
            }
            up.conn.display().sync(&up.queue.handle(), CbData::Sync(2));
            up.sync2_sent = true;
            up.conn.flush().map_err(|e| format!("wayland flush: {e}"))?;
        }
        if now.saturating_duration_since(up.started) > SETUP_TIMEOUT {
            return Err("compositor did not answer the setup in time".into());
        }
        Ok(())
    }

    /// Create surfaces for enabled connectors that have none; show their front slot.
    fn sync_surfaces(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        if !up.ready {
            return;
        }
        let want: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(id, c)| c.enabled && !up.surfaces.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        let mut created = Vec::new();
        for id in want {
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            let sc = surface_config(&self.cfg, &c.unique_id);
            if let Some(s) = create_surface(up, &self.cfg, &sc, id, &c.unique_id) {
                match s.role {
                    Role::Ivi(_) => self.stats.ivi_surfaces += 1,
                    Role::Xdg(..) => self.stats.xdg_surfaces += 1,
                }
                up.surfaces.insert(id, s);
                created.push((id, c.front));
            }
        }
        // A surface that needs no configure (ivi) shows the picture at once.
        for (id, front) in created {
            if let Some(slot) = front {
                let _ = self.commit(id, slot, false);
            }
        }
    }

    /// Attach picture `pic` of `conn` and commit; `track`: ask for presentation of it.
    fn commit(&mut self, id: ConnectorId, pic: Pic, track: bool) -> Option<u64> {
        let Link::Up(up) = &mut self.link else {
            return None;
        };
        let qh = up.queue.handle();
        let c = self.conns.get_mut(&id)?;
        let surf = up.surfaces.get_mut(&id)?;
        if !surf.configured {
            return None;
        }
        // A compositor that stopped releasing (hung, stopped) gets no more buffers than
        // the one on screen and one more: further frames wait in our slots.
        let shm_held = c.store.as_ref().map_or(0, |store| {
            (0..SLOTS)
                .filter(|&i| Pic::Shm(i) != pic && store.held[i])
                .count()
        });
        let dma_held = self
            .dfbs
            .iter()
            .filter(|(k, d)| Pic::Dma(**k) != pic && d.held && d.conn == Some(id))
            .count()
            + self
                .doomed
                .iter()
                .filter(|(_, conn, _)| *conn == Some(id))
                .count();
        if shm_held + dma_held > 1 {
            return None;
        }
        let g = &up.st.globals;
        let (buf, width, height) = match pic {
            Pic::Shm(slot) => {
                let store = c.store.as_mut()?;
                let shm = g.shm.as_ref()?;
                if surf
                    .pool
                    .as_ref()
                    .is_none_or(|(gen, _, _)| *gen != store.gen)
                {
                    if let Some((_, pool, bufs)) = surf.pool.take() {
                        for b in bufs.into_iter().flatten() {
                            b.destroy();
                        }
                        pool.destroy();
                    }
                    let pool =
                        shm.create_pool(store.file.as_fd(), store.file_len() as i32, &qh, ());
                    surf.pool = Some((store.gen, pool, vec![None; SLOTS]));
                }
                let (_, pool, bufs) = surf.pool.as_mut()?;
                let geo = store.geo;
                let buf = bufs.get_mut(slot)?.get_or_insert_with(|| {
                    let format = wl_shm::Format::try_from(geo.shm_format)
                        .unwrap_or(wl_shm::Format::Xrgb8888);
                    pool.create_buffer(
                        store_offset(store, slot),
                        geo.width as i32,
                        geo.height as i32,
                        geo.stride as i32,
                        format,
                        &qh,
                        BufData {
                            conn: id,
                            gen: store.gen,
                            slot,
                        },
                    )
                });
                store.held[slot] = true;
                (buf.clone(), geo.width, geo.height)
            }
            Pic::Dma(key) => {
                let d = self.dfbs.get_mut(&key)?;
                let DmaState::Ready(buf) = &d.state else {
                    return None;
                };
                d.held = true;
                d.conn = Some(id);
                c.frame_size = Some((d.layout.width, d.layout.height));
                (buf.clone(), d.layout.width, d.layout.height)
            }
        };
        surf.wl.attach(Some(&buf), 0, 0);
        if surf.opaque != Some((width, height)) {
            // A guest display has no transparency: say so, so that the compositor never
            // blends the X byte (guests often leave it 0) as alpha.
            if let Some(comp) = &g.compositor {
                let region = comp.create_region(&qh, ());
                region.add(0, 0, width as i32, height as i32);
                surf.wl.set_opaque_region(Some(&region));
                region.destroy();
                surf.opaque = Some((width, height));
            }
        }
        if surf.wl.version() >= 4 {
            surf.wl.damage_buffer(0, 0, width as i32, height as i32);
        } else {
            surf.wl.damage(0, 0, width as i32, height as i32);
        }
        if let Some(vp) = &surf.viewport {
            let (w, h) = surf.size;
            if w > 0 && h > 0 && (w as u32, h as u32) != (width, height) {
                let (dw, dh) = fit(width, height, w, h);
                vp.set_destination(dw, dh);
                surf.dest = Some((dw, dh));
            } else {
                vp.set_destination(-1, -1);
                surf.dest = None;
            }
        }
        let seq = surf.next_seq;
        surf.next_seq += 1;
        if track {
            match &g.presentation {
                Some(p) => {
                    p.feedback(&surf.wl, &qh, FeedbackData { conn: id, seq });
                }
                None => {
                    surf.wl.frame(&qh, CbData::Frame(id, seq));
                }
            }
        }
        surf.wl.commit();
        c.committed = Some(pic);
        if let Err(e) = up.conn.flush() {
            if !matches!(&e, WaylandError::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
                self.broken = Some(format!("wayland flush: {e}"));
            }
        }
        Some(seq)
    }

    /// Ask the compositor for the `wl_buffer` of every dma-buf framebuffer that has
    /// none on this connection; what cannot be asked for is `Failed` (copied).
    fn create_dmabufs(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        if !up.ready {
            return;
        }
        let qh = up.queue.handle();
        let mut sent = false;
        for (key, d) in self
            .dfbs
            .iter_mut()
            .filter(|(_, d)| matches!(d.state, DmaState::Unsent))
        {
            let Some(dm) = up.st.globals.dmabuf.as_ref() else {
                d.state = DmaState::Failed("the compositor offers no zwp_linux_dmabuf_v1");
                continue;
            };
            let Some(choice) = dmabuf::choose_dmabuf(d.layout.format, &up.st.dmabuf_formats) else {
                d.state =
                    DmaState::Failed("the compositor imports no linear dma-buf of this format");
                continue;
            };
            let Some(fd) = self.imports.get(&d.import) else {
                d.state = DmaState::Failed("import released");
                continue;
            };
            match dmabuf::create_buffer(
                dm,
                fd.as_fd(),
                &d.layout,
                choice,
                dmabuf::DmabufKey(*key),
                &qh,
            ) {
                Some(_) => {
                    d.state = DmaState::Pending(Instant::now());
                    sent = true;
                }
                None => d.state = DmaState::Failed("layout too large for the protocol"),
            }
        }
        if sent {
            if let Err(e) = up.conn.flush() {
                if !matches!(&e, WaylandError::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
                    self.broken = Some(format!("wayland flush: {e}"));
                }
            }
        }
    }

    /// Take the compositor's answers to buffer creations and its releases of dma-buf
    /// buffers; a released buffer of a removed framebuffer is destroyed now.
    fn handle_dmabuf(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        for (key, answer) in std::mem::take(&mut up.st.dmabuf_created) {
            let d = self
                .dfbs
                .get_mut(&key.0)
                .filter(|d| matches!(d.state, DmaState::Pending(_)));
            match (d, answer) {
                (Some(d), dmabuf::Created::Buffer(b)) => d.state = DmaState::Ready(b),
                (Some(d), dmabuf::Created::Failed) => {
                    d.state = DmaState::Failed("the compositor failed to import it")
                }
                // Removed (or refused after waiting) meanwhile.
                (None, dmabuf::Created::Buffer(b)) => {
                    up.st.dmabuf_ids.remove(&b.id());
                    b.destroy();
                }
                (None, dmabuf::Created::Failed) => {}
            }
        }
        for key in std::mem::take(&mut up.st.dmabuf_released) {
            if let Some(d) = self.dfbs.get_mut(&key.0) {
                d.held = false;
            }
            self.doomed.retain(|(k, _, b)| {
                let keep = *k != key.0;
                if !keep {
                    up.st.dmabuf_ids.remove(&b.id());
                    b.destroy();
                }
                keep
            });
        }
    }

    /// The picture of an imported frame: its dma-buf `wl_buffer`, created or still
    /// pending (the flip is then deferred, never waited for: [`Deferred`]). A buffer the
    /// compositor cannot take is refused ([`OutputError::ImportRefused`]): the caller
    /// copies that buffer from then on. Without a compositor the frame is taken (its
    /// flip completes on the timer) and checked once one is connected.
    fn dma_pic(&mut self, id: ConnectorId, f: &ImportedFrame) -> Result<Pic, OutputError> {
        let key = f.fb.0;
        let Some(d) = self.dfbs.get(&key) else {
            return Err(OutputError::NotConfigured);
        };
        let whole = (f.x, f.y, f.width, f.height) == (0, 0, d.layout.width, d.layout.height);
        if !whole {
            return Err(self.refuse_dma(
                id,
                key,
                "a source rectangle other than the whole framebuffer",
            ));
        }
        self.create_dmabufs();
        // Answers already read (by an earlier dispatch) count; nothing is waited for.
        self.handle_dmabuf();
        match self.dfbs.get(&key).map(|d| &d.state) {
            Some(DmaState::Failed(why)) => Err(self.refuse_dma(id, key, why)),
            _ => Ok(Pic::Dma(key)),
        }
    }

    /// When a flip of dma-buf framebuffer `key` must stop waiting for its `wl_buffer`:
    /// `Some` while the creation is pending.
    fn create_deadline(&self, key: u64) -> Option<Instant> {
        match self.dfbs.get(&key).map(|d| &d.state) {
            Some(DmaState::Pending(asked)) => Some(*asked + self.create_wait),
            _ => None,
        }
    }

    /// A copy of dma-buf framebuffer `key`'s pixels in a `wl_shm` slot of `id` (our own
    /// reference to the dma-buf, mapped for the copy and unmapped after).
    fn copy_dfb(&mut self, id: ConnectorId, key: u64) -> Result<Pic, String> {
        let d = self.dfbs.get(&key).ok_or("framebuffer removed")?;
        let layout = d.layout;
        let fd = self.imports.get(&d.import).ok_or("import released")?;
        let need = (layout.pitch as usize)
            .checked_mul(layout.height as usize)
            .and_then(|n| n.checked_add(layout.offset as usize))
            .ok_or("layout overflows")?;
        let min_pitch = row_bytes(layout.format, layout.width).ok_or("layout overflows")?;
        if (layout.pitch as usize) < min_pitch {
            return Err("pitch shorter than a row".into());
        }
        // A mapping past the end of the file would fault on access: check the size.
        let mut file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
        let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
            .map_err(|e| format!("dma-buf size: {e}"))?;
        if (size as usize) < need {
            return Err(format!(
                "dma-buf of {size} bytes, the framebuffer needs {need}"
            ));
        }
        let mem = crate::backend::mem::shared(file.as_fd(), need)
            .map_err(|e| format!("mapping the dma-buf: {e}"))?;
        let frame = Frame {
            mem: &mem,
            offset: layout.offset as usize,
            width: layout.width,
            height: layout.height,
            pitch: layout.pitch,
            format: layout.format,
            fb_cookie: 0,
        };
        let slot = self.render(id, &frame).map_err(|e| e.to_string())?;
        self.stats.copied += 1;
        Ok(Pic::Shm(slot))
    }

    fn refuse_dma(&mut self, id: ConnectorId, key: u64, why: &str) -> OutputError {
        self.stats.dmabuf_refused += 1;
        warn_limited!(
            ?id,
            fb = key,
            refused = self.stats.dmabuf_refused,
            "wayland: the compositor cannot show a guest dma-buf ({why}); that buffer is copied"
        );
        OutputError::ImportRefused(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Forget dma-buf framebuffer `key`; its `wl_buffer` is destroyed now if the
    /// compositor does not hold it, else when it is released.
    fn remove_dfb(&mut self, key: u64) {
        if !self.dfbs.contains_key(&key) {
            return;
        }
        self.copy_out(key, Instant::now());
        let Some(d) = self.dfbs.remove(&key) else {
            return;
        };
        for c in self.conns.values_mut() {
            if c.front == Some(Pic::Dma(key)) {
                c.front = None;
            }
        }
        if let DmaState::Ready(b) = d.state {
            if d.held {
                self.doomed.push((key, d.conn, b));
            } else {
                if let Link::Up(up) = &mut self.link {
                    up.st.dmabuf_ids.remove(&b.id());
                    let _ = up.conn.flush();
                }
                b.destroy();
            }
        }
    }

    /// Dma-buf framebuffer `key` is being removed: each connector picture that still
    /// names it (on screen, committed, in flight, deferred, queued, simulated) becomes a
    /// copy of its pixels, and a copy replaces it on the surface at once: the compositor
    /// then releases the dma-buf's `wl_buffer` (destroyed then, never before) without a
    /// further guest flip, so that DBUF_DESTROY's wait for the guest's pages ends. The
    /// picture stays as it was; nothing here waits.
    fn copy_out(&mut self, key: u64, now: Instant) {
        let dma = Pic::Dma(key);
        let users: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.front == Some(dma)
                    || c.committed == Some(dma)
                    || c.inflight.as_ref().is_some_and(|f| f.slot == dma)
                    || c.deferred.as_ref().is_some_and(|d| d.key == key)
                    || c.queued.as_ref().is_some_and(|q| q.slot == dma)
                    || c.sim.as_ref().is_some_and(|s| s.slot == dma)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in users {
            let copy = match self.copy_dfb(id, key) {
                Ok(pic) => Some(pic),
                Err(why) => {
                    // Taken off the surface all the same (below): the compositor must
                    // let go of the guest's pages.
                    warn_limited!(
                        ?id,
                        fb = key,
                        "wayland: copying a removed dma-buf failed ({why}); its picture is dropped"
                    );
                    None
                }
            };
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let mut done = Vec::new();
            if c.front == Some(dma) {
                c.front = copy;
            }
            if let Some(s) = c.sim.as_mut().filter(|s| s.slot == dma) {
                match copy {
                    Some(p) => s.slot = p,
                    None => {
                        if let Some(s) = c.sim.take() {
                            done.extend(s.cookies);
                        }
                    }
                }
            }
            if let Some(q) = c.queued.as_mut().filter(|q| q.slot == dma) {
                match copy {
                    Some(p) => q.slot = p,
                    None => {
                        if let Some(q) = c.queued.take() {
                            done.extend(q.cookies);
                        }
                    }
                }
            }
            let deferred = c.deferred.take_if(|d| d.key == key);
            let retarget = c.inflight.as_ref().is_some_and(|f| f.slot == dma);
            let committed = c.committed == Some(dma);
            if !done.is_empty() {
                self.stats.unshown += 1;
                self.complete(id, done);
            }
            match (copy, deferred) {
                (Some(p), Some(d)) => self.submit(id, p, d.cookies, now),
                (None, Some(d)) => {
                    self.stats.unshown += 1;
                    self.complete(id, d.cookies);
                }
                _ => {}
            }
            let Some(p) = copy else {
                if committed {
                    // No copy to attach instead: a new surface (attaching no buffer
                    // would unmap an xdg toplevel for good); the old one's buffers are
                    // the compositor's no more.
                    self.destroy_surface(id);
                    self.sync_surfaces();
                }
                continue;
            };
            if retarget {
                // The flip in flight now shows the copy; its presentation is tracked
                // anew (the compositor discards the feedback of the replaced commit).
                if let Some(seq) = self.commit(id, p, true) {
                    if let Some(f) = self.conns.get_mut(&id).and_then(|c| c.inflight.as_mut()) {
                        f.slot = p;
                        f.seq = seq;
                        f.shown = false;
                    }
                } else if let Some(f) = self.conns.get_mut(&id).and_then(|c| c.inflight.as_mut()) {
                    // Not committed now (the compositor holds too many buffers): the
                    // copy goes out when it releases them (`handle_events` catches up).
                    f.slot = p;
                }
            } else if committed {
                let _ = self.commit(id, p, false);
            }
        }
    }

    /// Commit `slot` as a tracked flip of `conn` (it has no flip in flight). A dma-buf
    /// whose `wl_buffer` is still pending defers the flip ([`Deferred`]); one the
    /// compositor failed (or did not answer in time) goes as a copy of its pixels.
    fn submit(&mut self, id: ConnectorId, mut slot: Pic, cookies: Vec<u64>, now: Instant) {
        if let Pic::Dma(key) = slot {
            if let Some(deadline) = self.create_deadline(key) {
                if now < deadline {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.deferred = Some(Deferred {
                            key,
                            cookies,
                            deadline,
                        });
                    }
                    return;
                }
                if let Some(d) = self.dfbs.get_mut(&key) {
                    // A late `created` is destroyed when it comes (`handle_dmabuf`).
                    d.state = DmaState::Failed("the compositor did not answer in time");
                }
            }
            if let Some(DmaState::Failed(why)) = self.dfbs.get(&key).map(|d| &d.state) {
                let _ = self.refuse_dma(id, key, why);
                match self.copy_dfb(id, key) {
                    Ok(pic) => slot = pic,
                    Err(why) => {
                        // Nothing new to show: the flip completes, counted as unshown.
                        warn_limited!(
                            ?id,
                            fb = key,
                            "wayland: copying a refused dma-buf failed ({why}); flip not shown"
                        );
                        self.stats.unshown += 1;
                        self.complete(id, cookies);
                        return;
                    }
                }
            }
        }
        match self.commit(id, slot, true) {
            Some(seq) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.inflight = Some(Inflight {
                        slot,
                        seq,
                        cookies,
                        prev: c.front,
                        shown: false,
                        deadline: now + UNSHOWN_FLIP,
                    });
                }
            }
            None => self.simulate(id, slot, cookies, now),
        }
    }

    /// No surface to show `slot` on: complete at the next 60 Hz tick (latest wins).
    fn simulate(&mut self, id: ConnectorId, slot: Pic, mut cookies: Vec<u64>, now: Instant) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.sim.take() {
            Some(mut s) => {
                s.cookies.append(&mut cookies);
                s.slot = slot;
                c.sim = Some(s);
            }
            None => {
                let due = Self::next_tick(c, now);
                c.sim = Some(Simulated { slot, cookies, due });
            }
        }
    }

    /// Deferred flips whose dma-buf `wl_buffer` was answered (or whose deadline passed)
    /// go out now: committed, or copied.
    fn resolve_deferred(&mut self, now: Instant) {
        let due: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.deferred
                    .as_ref()
                    .is_some_and(|d| now >= d.deadline || self.create_deadline(d.key).is_none())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(d) = self.conns.get_mut(&id).and_then(|c| c.deferred.take()) {
                self.submit(id, Pic::Dma(d.key), d.cookies, now);
            }
        }
    }

    fn handle_events(&mut self, now: Instant) {
        self.handle_dmabuf();
        let events = match &mut self.link {
            Link::Up(up) => std::mem::take(&mut up.st.events),
            Link::Down { .. } => return,
        };
        for ev in events {
            match ev {
                Ev::Configured {
                    conn,
                    width,
                    height,
                } => {
                    let first = match &mut self.link {
                        Link::Up(up) => match up.surfaces.get_mut(&conn) {
                            Some(s) => {
                                let first = !s.configured;
                                s.configured = true;
                                s.size = (width, height);
                                first
                            }
                            None => false,
                        },
                        Link::Down { .. } => false,
                    };
                    let front = self.conns.get(&conn).and_then(|c| c.front);
                    if let Some(slot) = front {
                        // Map the surface (first configure) or apply the new size.
                        let _ = self.commit(conn, slot, false);
                    } else if first {
                        tracing::debug!(?conn, "surface configured, nothing to show yet");
                    }
                }
                Ev::Released(b) => {
                    if let Some(s) = self.conns.get_mut(&b.conn).and_then(|c| c.store.as_mut()) {
                        if s.gen == b.gen && b.slot < SLOTS {
                            s.held[b.slot] = false;
                        }
                    }
                }
                Ev::Shown {
                    conn,
                    seq,
                    discarded,
                } => {
                    if let Some(f) = self
                        .conns
                        .get_mut(&conn)
                        .and_then(|c| c.inflight.as_mut())
                        .filter(|f| f.seq == seq)
                    {
                        f.shown = true;
                        if discarded {
                            self.stats.unshown += 1;
                        } else {
                            self.stats.presented += 1;
                        }
                    }
                }
                Ev::CloseRequested(conn) => {
                    info!(
                        ?conn,
                        "compositor asked to close a guest's window: it stays (the guest owns it)"
                    );
                }
            }
        }
        self.finish_flips(now);
        // Catch up: a picture that could not be committed (buffers not released) goes
        // out once the compositor gives buffers back.
        let behind: Vec<(ConnectorId, Pic)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.inflight.is_none()
                    && c.deferred.is_none()
                    && c.sim.is_none()
                    && c.front != c.committed
            })
            .filter_map(|(id, c)| c.front.map(|f| (*id, f)))
            .collect();
        for (id, slot) in behind {
            let _ = self.commit(id, slot, false);
        }
    }

    /// Complete in-flight flips that were shown (and whose previous buffer came back),
    /// or that waited too long; submit the queued ones.
    fn finish_flips(&mut self, now: Instant) {
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(f) = c.inflight.as_ref() else {
                continue;
            };
            let prev_free = match (f.prev, c.store.as_ref()) {
                (Some(p), _) if p == f.slot => true,
                (Some(Pic::Shm(p)), Some(s)) => !s.held[p],
                // A dma-buf picture: its wl_buffer (live or removed) came back.
                (Some(Pic::Dma(k)), _) => {
                    !self.dfbs.get(&k).is_some_and(|d| d.held)
                        && !self.doomed.iter().any(|(d, _, _)| *d == k)
                }
                _ => true,
            };
            let late = now >= f.deadline;
            let finished = late || (f.shown && prev_free);
            if !finished {
                continue;
            }
            if late && !f.shown {
                self.stats.unshown += 1;
            }
            let Some(f) = c.inflight.take() else {
                continue;
            };
            c.front = Some(f.slot);
            let queued = c.queued.take();
            self.complete(id, f.cookies);
            if let Some(q) = queued {
                self.submit(id, q.slot, q.cookies, now);
            }
        }
    }

    fn finish_simulated(&mut self, now: Instant) {
        let due: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.sim.as_ref().is_some_and(|s| s.due <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(s) = c.sim.take() else {
                continue;
            };
            c.last_tick = Some(s.due);
            c.front = Some(s.slot);
            self.stats.simulated += s.cookies.len() as u64;
            self.complete(id, s.cookies);
            // A surface may have appeared meanwhile: show the picture.
            let _ = self.commit(id, s.slot, false);
        }
    }

    fn destroy_surface(&mut self, id: ConnectorId) {
        if let Link::Up(up) = &mut self.link {
            if let Some(s) = up.surfaces.remove(&id) {
                s.destroy();
                self.seat.forget(id, &mut self.seat_out);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.committed = None;
                    if let Some(st) = c.store.as_mut() {
                        // A destroyed buffer is never released: ours again.
                        st.forget_held();
                    }
                }
                // Off the destroyed surface, its dma-buf buffers are the compositor's no
                // more: live ones are ours again, removed ones can go.
                for d in self.dfbs.values_mut().filter(|d| d.conn == Some(id)) {
                    d.held = false;
                }
                self.doomed.retain(|(_, conn, b)| {
                    let keep = *conn != Some(id);
                    if !keep {
                        up.st.dmabuf_ids.remove(&b.id());
                        b.destroy();
                    }
                    keep
                });
                up.st.toplevel_size.remove(&id);
                let _ = up.conn.flush();
            }
        }
    }
}

/// The `wl_shm` slot of a picture, if it is one.
fn shm_slot(pic: Option<Pic>) -> Option<usize> {
    match pic {
        Some(Pic::Shm(i)) => Some(i),
        _ => None,
    }
}

fn surface_config(cfg: &WaylandConfig, unique_id: &str) -> SurfaceConfig {
    cfg.surfaces.get(unique_id).cloned().unwrap_or_default()
}

fn store_offset(store: &Store, slot: usize) -> i32 {
    store.offset(slot) as i32
}

/// A new surface for connector `id` with the shell its config asks for.
fn create_surface(
    up: &mut Up,
    cfg: &WaylandConfig,
    sc: &SurfaceConfig,
    id: ConnectorId,
    unique_id: &str,
) -> Option<Surf> {
    let qh = up.queue.handle();
    let g = &up.st.globals;
    let compositor = g.compositor.as_ref()?;
    let shell = sc.shell.unwrap_or(cfg.shell);
    let ivi_id = sc.ivi_id.or_else(|| unique_id.parse::<u32>().ok());
    let use_ivi = match (shell, &g.ivi, ivi_id) {
        (ShellChoice::Xdg, _, _) => false,
        (_, Some(_), Some(_)) => true,
        (ShellChoice::Ivi, _, _) => {
            warn!(
                ?id,
                unique_id,
                "ivi shell asked for but not offered (or no numeric id): using xdg-shell"
            );
            false
        }
        _ => false,
    };
    let wl = compositor.create_surface(&qh, id);
    let viewport = g.viewporter.as_ref().map(|v| v.get_viewport(&wl, &qh, ()));
    let role = if use_ivi {
        let (Some(ivi), Some(n)) = (&g.ivi, ivi_id) else {
            return None;
        };
        let s = ivi.surface_create(n, &wl, &qh, id);
        info!(
            ?id,
            unique_id,
            ivi_id = n,
            "wayland surface (ivi-application)"
        );
        Role::Ivi(s)
    } else {
        let Some(wm) = &g.wm_base else {
            warn!(?id, "no xdg_wm_base: connector not shown");
            wl.destroy();
            return None;
        };
        let xs = wm.get_xdg_surface(&wl, &qh, id);
        let top = xs.get_toplevel(&qh, id);
        let title = sc
            .title
            .clone()
            .unwrap_or_else(|| format!("dom{} {unique_id}", id.dom.0));
        top.set_title(title.clone());
        top.set_app_id("displback".into());
        if sc.fullscreen.unwrap_or(cfg.fullscreen) {
            top.set_fullscreen(None);
        }
        info!(
            ?id,
            unique_id, title, "wayland surface (xdg-shell toplevel)"
        );
        Role::Xdg(xs, top)
    };
    let ivi = matches!(role, Role::Ivi(_));
    // xdg-shell: the first commit without a buffer asks for the first configure;
    // ivi-shell needs none (configure events come from the IVI controller).
    wl.commit();
    Some(Surf {
        wl,
        role,
        viewport: if ivi { None } else { viewport },
        configured: ivi,
        size: (0, 0),
        pool: None,
        next_seq: 1,
        opaque: None,
        dest: None,
    })
}

impl Output for Wayland {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        _width: u32,
        _height: u32,
    ) -> Result<(), OutputError> {
        if self
            .conns
            .iter()
            .any(|(id, c)| *id != conn && c.unique_id == unique_id)
        {
            warn_limited!(?conn, unique_id, "wayland connector already in use");
            return Err(OutputError::InUse(unique_id.to_owned()));
        }
        self.remove_connector(conn);
        self.conns.insert(
            conn,
            Conn {
                unique_id: unique_id.to_owned(),
                enabled: false,
                store: None,
                front: None,
                inflight: None,
                deferred: None,
                queued: None,
                sim: None,
                last_tick: None,
                committed: None,
                frame_size: None,
            },
        );
        Ok(())
    }

    fn remove_connector(&mut self, conn: ConnectorId) {
        self.destroy_surface(conn);
        self.flush_seat();
        self.conns.remove(&conn);
        self.immediate.retain(|d| d.conn != conn);
    }

    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        if !self.conns.contains_key(&conn) {
            return Err(OutputError::NotConfigured);
        }
        let dma = match frame {
            Some(FrameSource::Imported(f)) => Some(self.dma_pic(conn, f)?),
            _ => None,
        };
        self.flush_pending(conn);
        let slot = match (frame, dma) {
            (Some(_), Some(pic)) => {
                self.stats.zero_copy += 1;
                pic
            }
            (Some(FrameSource::Mapped(f)), _) => {
                let slot = Pic::Shm(self.render(conn, f)?);
                self.stats.copied += 1;
                slot
            }
            _ => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.enabled = false;
                    c.front = None;
                    c.last_tick = None;
                }
                self.destroy_surface(conn);
                return Ok(());
            }
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.enabled = true;
            c.front = Some(slot);
        }
        self.sync_surfaces();
        let _ = self.commit(conn, slot, false);
        Ok(())
    }

    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        if !self.conns.get(&conn).is_some_and(|c| c.enabled) {
            return Err(OutputError::NotConfigured);
        }
        let slot = match frame {
            FrameSource::Mapped(f) => {
                let slot = Pic::Shm(self.render(conn, f)?);
                self.stats.copied += 1;
                slot
            }
            FrameSource::Imported(f) => {
                let pic = self.dma_pic(conn, f)?;
                self.stats.zero_copy += 1;
                pic
            }
        };
        let fb_cookie = frame.fb_cookie();
        let now = Instant::now();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(OutputError::NotConfigured);
        };
        if c.inflight.is_some() || c.deferred.is_some() {
            // Latest wins (as the KMS flip queue): the queued one is replaced, its
            // cookies ride along; the one in flight (or deferred) is never replaced.
            let mut cookies = c.queued.take().map(|q| q.cookies).unwrap_or_default();
            cookies.push(fb_cookie);
            c.queued = Some(Waiting { slot, cookies });
            return Ok(());
        }
        if c.sim.is_some() {
            self.simulate(conn, slot, vec![fb_cookie], now);
            return Ok(());
        }
        self.submit(conn, slot, vec![fb_cookie], now);
        Ok(())
    }

    fn flip_busy(&self, conn: ConnectorId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.inflight.is_some() || c.deferred.is_some() || c.sim.is_some())
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.poll.as_raw_fd())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        // Events read outside `dispatch` (none today) are handled at once.
        let unhandled = matches!(&self.link, Link::Up(up)
            if !up.st.events.is_empty() || !up.st.dmabuf_released.is_empty()
                || !up.st.dmabuf_created.is_empty());
        if !self.immediate.is_empty() || self.broken.is_some() || unhandled {
            return Some(now);
        }
        let link = match &self.link {
            Link::Down { .. } if self.connecting.is_some() => self
                .connecting
                .as_ref()
                .filter(|c| !c.warned)
                .map(|c| c.since + SETUP_TIMEOUT),
            Link::Down { retry_at, .. } => Some(*retry_at),
            Link::Up(up) if !up.ready => Some(up.started + SETUP_TIMEOUT),
            Link::Up(_) => None,
        };
        let flips = self.conns.values().flat_map(|c| {
            c.inflight
                .as_ref()
                .map(|f| f.deadline)
                .into_iter()
                .chain(c.deferred.as_ref().map(|d| d.deadline))
                .chain(c.sim.as_ref().map(|s| s.due))
        });
        link.into_iter().chain(flips).min()
    }

    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        // Empty the epoll fd's ready list (its readiness is only a wake-up).
        let _ = self.poll.poll(&mut self.events, Some(Duration::ZERO));
        if let Some(why) = self.broken.take() {
            self.disconnect(now, why);
        }
        if let Link::Down { retry_at, .. } = self.link {
            if self.connecting.is_some() {
                self.poll_connect(now);
            } else if now >= retry_at {
                self.start_connect(now);
                // Usually done at once: do not wait for the wake-up.
                std::thread::yield_now();
                self.poll_connect(now);
            }
        }
        if let Link::Up(up) = &mut self.link {
            let was_ready = up.ready;
            let res = Self::pump(up).and_then(|()| self.advance_setup(now));
            match res {
                Err(why) => self.disconnect(now, why),
                Ok(()) => {
                    if !was_ready && self.connected() {
                        self.create_dmabufs();
                        self.sync_surfaces();
                        if let Link::Up(up) = &mut self.link {
                            let _ = up.conn.flush();
                        }
                    }
                    self.handle_events(now);
                    self.handle_seat();
                }
            }
        }
        self.finish_flips(now);
        self.resolve_deferred(now);
        self.finish_simulated(now);
        if let Some(why) = self.broken.take() {
            self.disconnect(now, why);
        }
        done.append(&mut self.immediate);
        if let Ok(mut s) = self.shared.lock() {
            *s = self.stats;
        }
    }

    fn take_input(&mut self, out: &mut Vec<SeatInput>) {
        self.flush_seat();
        out.append(&mut self.seat_ready);
    }

    /// Keep our own reference to the guest's dma-buf; whether the compositor can
    /// import it is known per framebuffer (a simulated fd cannot be passed: copied).
    fn import_dmabuf(&mut self, dmabuf: &DmaBufFd) -> Result<ImportId, OutputError> {
        let fd = dmabuf.as_fd().ok_or(OutputError::Unsupported)?;
        let own = fd.try_clone_to_owned()?;
        let id = ImportId(self.next_import);
        self.next_import += 1;
        self.imports.insert(id, own);
        Ok(id)
    }

    /// A dma-buf framebuffer: its `wl_buffer` is asked for now (answered before the
    /// first flip of it, normally), and again on each new connection.
    fn add_imported_fb(
        &mut self,
        import: ImportId,
        layout: &FbLayout,
    ) -> Result<ImportedFb, OutputError> {
        if !self.imports.contains_key(&import) {
            return Err(OutputError::NotConfigured);
        }
        let key = self.next_dfb;
        self.next_dfb += 1;
        self.dfbs.insert(
            key,
            DmaFb {
                import,
                layout: *layout,
                state: DmaState::Unsent,
                held: false,
                conn: None,
            },
        );
        self.create_dmabufs();
        Ok(ImportedFb(key))
    }

    fn remove_imported_fb(&mut self, fb: ImportedFb) {
        self.remove_dfb(fb.0);
    }

    fn release_import(&mut self, import: ImportId) {
        let keys: Vec<u64> = self
            .dfbs
            .iter()
            .filter(|(_, d)| d.import == import)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.remove_dfb(k);
        }
        // The compositor holds its own reference for as long as it holds a buffer.
        self.imports.remove(&import);
    }

    fn target(&self, conn: ConnectorId) -> Option<String> {
        let c = self.conns.get(&conn)?;
        let state = match &self.link {
            Link::Up(up) if up.ready => match up.surfaces.get(&conn).map(|s| &s.role) {
                Some(Role::Ivi(_)) => "ivi",
                Some(Role::Xdg(..)) => "xdg",
                None => "no surface",
            },
            _ => "no compositor",
        };
        Some(format!("wayland {} ({state})", c.unique_id))
    }
}

#[cfg(test)]
mod testcomp;
#[cfg(test)]
mod tests;
