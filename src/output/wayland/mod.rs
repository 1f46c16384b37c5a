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
//!
//! Code by concern: [`link`] (connection, setup, reconnect), [`surface`] (surfaces,
//! shells, commits), [`buffers`] (the `wl_shm` store's copies and dma-buf
//! `wl_buffer`s), [`flips`] (flips, deferral, presentation); this file holds the
//! configuration, the format choice and the [`Output`] implementation.

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
    Output, OutputError, PixelSource, SeatInput,
};
use crate::displif::format::{fourcc, PixelFormat};
use crate::warn_limited;
use crate::zcopy::DmaBufFd;

pub mod dmabuf;
pub mod proto;
pub mod seat;
pub mod store;

mod buffers;
mod flips;
mod link;
mod surface;

use crate::kbdif::device::{Input, MAX_CONTACTS};
use proto::{BufData, CbData, Ev, FeedbackData, Session};
use seat::{Mapping, Seat, SeatStats};
use store::{Geometry, Store, SLOTS};

use buffers::*;
use flips::*;
use link::*;
use surface::*;

/// A committed flip the compositor neither presents nor discards in this long (a hidden
/// or minimised surface gets no frame callbacks) completes anyway.
pub const UNSHOWN_FLIP: Duration = Duration::from_millis(100);

/// First retry after a failed connection; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

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

/// A flip of a dma-buf whose buffer creation the compositor has not answered yet (it is
/// asked for at FB_ATTACH, so normally answered long before the first flip of it) is
/// deferred, never waited for: it goes out once the answer is in, or as a copy when the
/// answer is `failed` or has not come this long after the creation was asked for.
pub const DMABUF_CREATE_WAIT: Duration = Duration::from_millis(200);

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
    /// dma-buf framebuffers the compositor imported (`created`: a `wl_buffer` of its own).
    pub dmabuf_imported: u64,
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
    /// How to read each import's pixels for a copy ([`Output::set_import_pixels`]);
    /// an import without one is read through its dma-buf.
    import_pixels: HashMap<ImportId, PixelSource>,
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
            import_pixels: HashMap::new(),
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
        let stalled = c.queued.as_ref().and_then(|q| q.stalled);
        if c.inflight.is_some() || c.deferred.is_some() || stalled.is_some() {
            // Latest wins (as the KMS flip queue): the queued one is replaced, its
            // cookies ride along; the one in flight (or deferred) is never replaced. A flip
            // held back by the compositor's buffers keeps its deadline.
            let mut cookies = c.queued.take().map(|q| q.cookies).unwrap_or_default();
            cookies.push(fb_cookie);
            c.queued = Some(Waiting {
                slot,
                cookies,
                stalled,
            });
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
        self.conns.get(&conn).is_some_and(|c| {
            c.inflight.is_some() || c.deferred.is_some() || c.sim.is_some() || c.queued.is_some()
        })
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
                .chain(match c.front {
                    Some(Pic::Dma(k)) => self.create_deadline(k),
                    _ => None,
                })
                .chain(c.sim.as_ref().map(|s| s.due))
                .chain(c.queued.as_ref().and_then(|q| q.stalled))
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
        self.retry_stalled(now);
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
        self.import_pixels.remove(&import);
    }

    fn set_import_pixels(&mut self, import: ImportId, pixels: PixelSource) {
        if self.imports.contains_key(&import) {
            self.import_pixels.insert(import, pixels);
        }
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
