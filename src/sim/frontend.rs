//! A simulated guest driver that behaves like Linux's `xen-drm-front`
//! (drivers/gpu/drm/xen/, see displif.md §1.3, §1.4, §1.8 and §4.2).
//!
//! It is driven synchronously by the calling thread: every call pumps XenStore watch
//! events and event-channel notifications as needed; there is no background thread.
//!
//! Where Linux silently tolerates a misbehaving backend (a response with the wrong id,
//! an event with an unexpected id), this frontend returns [`FrontError::Protocol`], so
//! tests catch it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::displif::request::{decode_event, decode_response, Request};
use crate::displif::ring::{EventConsumer, FrontRing};
use crate::displif::wire::{self, pgdir, ring, Slot};
use crate::sim::pattern;
use crate::sim::toolstack::{read_state, wait_readable};
use crate::sim::{SimEvtchn, SimGntalloc, SimGuestMem, SimPages, SimXen};
use crate::xen::mem::MappedRegion;
use crate::xen::platform::{EventChannels, GrantAllocator, PAGE_SIZE};
use crate::xen::types::{DomId, EvtchnPort, GrantRef, XenError, XenbusState};
use crate::xen::xenstore::{Tx, XsClient, XsError};

/// `XEN_DRM_FRONT_WAIT_BACK_MS`: how long a request waits for its response.
pub const WAIT_BACK: Duration = Duration::from_millis(3000);
/// `FRAME_DONE_TO_MS`: how long the frontend waits for a page-flip event.
pub const FRAME_DONE_TIMEOUT: Duration = Duration::from_millis(3100);
/// `XEN_DRM_FRONT_MAX_CRTCS`: connectors probed.
pub const MAX_CONNECTORS: usize = 4;
/// Driver unbind polls the backend state this often, this many times (Linux: 100 × 10 ms).
const UNBIND_POLL: Duration = Duration::from_millis(10);
const UNBIND_POLLS: u32 = 100;
/// Base of display-buffer cookies (Linux sends kernel pointers).
const DBUF_COOKIE_BASE: u64 = 0xffff_8880_0000_0000;
/// Base of framebuffer cookies.
const FB_COOKIE_BASE: u64 = 0xffff_8881_0000_0000;
const TOKEN_FRONT: &str = "front";
const TOKEN_BACK: &str = "back";

/// Errors of the simulated frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error(transparent)]
    Xs(#[from] XsError),
    #[error(transparent)]
    Xen(#[from] XenError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The backend broke the protocol (wrong response id or operation, unexpected event).
    #[error("backend protocol violation: {0}")]
    Protocol(String),
    /// The backend answered with a non-zero status (a negative errno).
    #[error("backend returned status {0}")]
    Status(i32),
    /// No such connector, or the rings are not set up (Linux: -EIO).
    #[error("connector {0} is not connected")]
    NotConnected(u32),
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

type Result<T, E = FrontError> = std::result::Result<T, E>;

/// A connector as configured by the toolstack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorCfg {
    pub unique_id: String,
    pub width: u32,
    pub height: u32,
}

/// Knobs for tests that deviate from what Linux does.
#[derive(Clone, Debug, Default)]
pub struct FrontOptions {
    /// Write `version` with the ring refs (Linux never does).
    pub write_version: Option<String>,
    /// Never consume the event pages (a frontend that ignores its events).
    pub never_consume_events: bool,
}

/// One connector's request ring and event page.
struct ConnRings {
    req: FrontRing,
    req_port: EvtchnPort,
    /// Id of the next request (u16, wraps).
    next_id: u16,
    evt: EventConsumer,
    evt_port: EvtchnPort,
    /// Events drained from the page, not yet consumed by a wait.
    events: VecDeque<wire::PgFlipEvt>,
    /// The id the next event must carry (0, 1, 2, ... since the connection was made).
    next_evt_id: u16,
    /// Grant refs of the ring page and the event page. Access ends when the pages are
    /// dropped with the rings (deferred while the backend still maps them).
    refs: [GrantRef; 2],
}

/// A dumb buffer shared with the backend.
pub struct DumbBuf {
    pub cookie: u64,
    pub width: u32,
    pub height: u32,
    pub bpp: u32,
    /// `ceil(width * bpp / 8)`, like Linux dumb buffers.
    pub pitch: u32,
    /// `pitch * height` (what DBUF_CREATE sends as `buffer_sz`).
    pub size: u32,
    /// The buffer's grant refs: ours (frontend-allocated) or the backend's (be-alloc).
    pub refs: Vec<GrantRef>,
    /// Grant refs of the page-directory pages (the first one is `gref_directory`).
    pub dir_refs: Vec<GrantRef>,
    mem: BufMem,
    dir: SimPages,
}

enum BufMem {
    /// Frontend-allocated pages, granted to the backend.
    Local(SimPages),
    /// Backend-allocated pages, mapped from the backend's grants.
    Foreign(MappedRegion),
}

impl DumbBuf {
    /// The buffer's pixels (whole pages; the first `size` bytes are the image).
    pub fn region(&self) -> &MappedRegion {
        match &self.mem {
            BufMem::Local(p) => p.region(),
            BufMem::Foreign(r) => r,
        }
    }

    /// True when the backend allocated the buffer.
    pub fn is_be_alloc(&self) -> bool {
        matches!(self.mem, BufMem::Foreign(_))
    }

    /// Draw frame `frame` of the test pattern for connector `conn` (32 bpp only).
    pub fn draw_pattern(&self, frame: u32, conn: u32) -> Result<()> {
        if self.bpp != 32 {
            return Err(FrontError::Invalid(format!(
                "pattern needs 32 bpp, buffer has {}",
                self.bpp
            )));
        }
        let mut row = vec![0u8; self.pitch as usize];
        for y in 0..self.height {
            for (x, px) in row.chunks_exact_mut(4).enumerate() {
                px.copy_from_slice(&pattern::pixel(frame, conn, x as u32, y).to_le_bytes());
            }
            self.region()
                .write(y as usize * self.pitch as usize, &row)
                .map_err(|e| FrontError::Invalid(e.to_string()))?;
        }
        Ok(())
    }
}

/// What `destroy_dumb` observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestroyOutcome {
    /// The DBUF_DESTROY status.
    pub status: i32,
    /// Whether ending foreign access to every grant of the buffer succeeded right after
    /// the response, i.e. the backend had unmapped them before replying. Always true for
    /// be-alloc buffers (only the directory is ours).
    pub end_access_ok: bool,
}

/// The simulated `xen-drm-front` instance of one vdispl device.
pub struct FrontendSim {
    xs: XsClient,
    evtchn: SimEvtchn,
    mem: SimGuestMem,
    gntalloc: Arc<SimGntalloc>,
    domid: DomId,
    dir: String,
    backend_dir: String,
    backend_id: DomId,
    opts: FrontOptions,
    /// The state we last wrote.
    state: XenbusState,
    /// The backend state we last saw.
    backend_state: XenbusState,
    /// Linux's `drm_info`: the DRM device exists (we reached Connected).
    drm_present: bool,
    /// The driver is unbound (after `close`) or the device was removed: ignore events.
    unbound: bool,
    be_alloc: bool,
    connectors: Vec<ConnectorCfg>,
    rings: Vec<ConnRings>,
    connects: u32,
    cookies: u64,
    /// How long a request waits for its response.
    request_timeout: Duration,
}

/// A frontend directory's `backend` and `backend-id` nodes, as a frontend reads them
/// at probe time; the inner `Err` says which one is missing or bad.
pub(crate) fn backend_of(
    xs: &mut XsClient,
    dir: &str,
) -> std::result::Result<std::result::Result<(String, DomId), String>, XsError> {
    let Some(backend_dir) = xs.read(Tx::NONE, &format!("{dir}/backend"))? else {
        return Ok(Err(format!("{dir}/backend is missing")));
    };
    let backend_id = xs
        .read(Tx::NONE, &format!("{dir}/backend-id"))?
        .and_then(|s| s.trim().parse::<u16>().ok())
        .map(DomId);
    Ok(match backend_id {
        Some(id) => Ok((backend_dir, id)),
        None => Err(format!("{dir}/backend-id is missing or bad")),
    })
}

impl FrontendSim {
    /// Probe device `devid` of guest `domid` like Linux's `xen_drv_probe`.
    pub fn new(sim: &SimXen, xs: XsClient, domid: DomId, devid: u32) -> Result<Self> {
        Self::with_options(sim, xs, domid, devid, FrontOptions::default())
    }

    /// `new` with test knobs.
    pub fn with_options(
        sim: &SimXen,
        mut xs: XsClient,
        domid: DomId,
        devid: u32,
        opts: FrontOptions,
    ) -> Result<Self> {
        let dir = format!("/local/domain/{domid}/device/vdispl/{devid}");
        let (backend_dir, backend_id) = backend_of(&mut xs, &dir)?.map_err(FrontError::Config)?;
        let mut fe = FrontendSim {
            xs,
            evtchn: sim.evtchn(domid),
            mem: sim.guest_mem(domid),
            gntalloc: sim.gntalloc(domid),
            domid,
            dir,
            backend_dir,
            backend_id,
            opts,
            state: XenbusState::Unknown,
            backend_state: XenbusState::Unknown,
            drm_present: false,
            unbound: false,
            be_alloc: false,
            connectors: Vec::new(),
            rings: Vec::new(),
            connects: 0,
            cookies: 0,
            request_timeout: WAIT_BACK,
        };
        fe.switch_state(XenbusState::Initialising)?;
        let dir = fe.dir.clone();
        let bstate = format!("{}/state", fe.backend_dir);
        fe.xs.watch(&dir, TOKEN_FRONT)?;
        fe.xs.watch(&bstate, TOKEN_BACK)?;
        Ok(fe)
    }

    /// Our XenbusState.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// The backend's XenbusState as last seen.
    pub fn backend_state(&self) -> XenbusState {
        self.backend_state
    }

    /// How often we reached Connected again after the first time.
    pub fn reconnects(&self) -> u32 {
        self.connects.saturating_sub(1)
    }

    /// The connectors read at the last handshake.
    pub fn connectors(&self) -> &[ConnectorCfg] {
        &self.connectors
    }

    /// `be-alloc` as read at the last handshake.
    pub fn be_alloc(&self) -> bool {
        self.be_alloc
    }

    /// Our domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Change the response timeout (default 3 s, as Linux), for tests.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// The XenStore connection (tests poke nodes with it).
    pub fn xs(&mut self) -> &mut XsClient {
        &mut self.xs
    }

    // ---- XenBus ----

    /// Process XenStore events and notifications for `timeout`.
    pub fn pump(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.pump_until(deadline, |_| false).map(drop)
    }

    /// Pump until we are Connected.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if self.pump_until(deadline, |fe| fe.state == XenbusState::Connected)? {
            Ok(())
        } else {
            Err(FrontError::Timeout(format!(
                "Connected (frontend {:?}, backend {:?})",
                self.state, self.backend_state
            )))
        }
    }

    /// Pump until `done` holds or `deadline` passes; returns whether `done` held.
    pub fn pump_until(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<bool> {
        loop {
            let had_xs = self.process_xs()?;
            self.process_evtchn()?;
            if done(self) {
                return Ok(true);
            }
            if had_xs {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            wait_readable(
                &[self.xs.as_raw_fd(), self.evtchn.as_raw_fd()],
                deadline - now,
            )?;
        }
    }

    /// Take pending watch events and react to the backend state; true if there were any.
    fn process_xs(&mut self) -> Result<bool> {
        let events = self.xs.take_watch_events()?;
        if events.is_empty() {
            return Ok(false);
        }
        if self.unbound {
            return Ok(true);
        }
        // A removed device: xenbus unregisters it (we cannot write our state any more).
        if self
            .xs
            .read(Tx::NONE, &format!("{}/state", self.dir))?
            .is_none()
        {
            tracing::debug!("frontend {}: device removed", self.dir);
            self.free_rings();
            self.drm_present = false;
            self.unbound = true;
            self.state = XenbusState::Closed;
            return Ok(true);
        }
        if events.iter().any(|e| e.token == TOKEN_BACK) {
            let path = format!("{}/state", self.backend_dir);
            let bs = read_state(&mut self.xs, &path)?;
            self.backend_changed(bs)?;
        }
        Ok(true)
    }

    /// Linux's `displback_changed`.
    fn backend_changed(&mut self, bs: XenbusState) -> Result<()> {
        use XenbusState as S;
        tracing::debug!(
            "frontend {}: backend {:?}, frontend {:?}",
            self.dir,
            bs,
            self.state
        );
        self.backend_state = bs;
        match bs {
            S::Reconfiguring | S::Reconfigured | S::Initialised | S::Closing => {}
            S::Initialising => {
                if self.state != S::Reconfiguring {
                    // "recovering after backend unexpected closure"
                    self.disconnect()?;
                }
            }
            S::InitWait => {
                if self.state == S::Reconfiguring {
                    return Ok(());
                }
                self.disconnect()?;
                if self.state != S::Initialising {
                    return Ok(());
                }
                self.initwait()?;
                self.switch_state(S::Initialised)?;
            }
            S::Connected => {
                if self.state != S::Initialised {
                    return Ok(());
                }
                self.drm_present = true;
                self.connects += 1;
                self.switch_state(S::Connected)?;
            }
            S::Unknown | S::Closed => {
                if self.state != S::Closed {
                    self.disconnect()?;
                }
            }
        }
        Ok(())
    }

    /// Linux's `displback_disconnect` + `xen_drm_drv_fini`: only when the DRM device
    /// exists. Linux goes back to Initialising at once with be-alloc=0 and only after the
    /// last DRM client closed with be-alloc=1; we have no clients, so always at once.
    fn disconnect(&mut self) -> Result<()> {
        if !self.drm_present {
            return Ok(());
        }
        self.switch_state(XenbusState::Reconfiguring)?;
        self.drm_present = false;
        self.free_rings();
        self.switch_state(XenbusState::Initialising)
    }

    /// Linux's `displback_initwait`: read the configuration, create and publish rings.
    fn initwait(&mut self) -> Result<()> {
        self.free_rings();
        self.read_config()?;
        for _ in 0..self.connectors.len() {
            let rings = self.alloc_rings()?;
            self.rings.push(rings);
        }
        let dir = self.dir.clone();
        let version = self.opts.write_version.clone();
        let nodes: Vec<(String, String)> = self
            .rings
            .iter()
            .enumerate()
            .flat_map(|(n, r)| {
                [
                    (format!("{dir}/{n}/req-ring-ref"), r.refs[0].0.to_string()),
                    (
                        format!("{dir}/{n}/req-event-channel"),
                        r.req_port.0.to_string(),
                    ),
                    (format!("{dir}/{n}/evt-ring-ref"), r.refs[1].0.to_string()),
                    (
                        format!("{dir}/{n}/evt-event-channel"),
                        r.evt_port.0.to_string(),
                    ),
                ]
            })
            .chain(version.map(|v| (format!("{dir}/version"), v)))
            .collect();
        self.xs.transaction(|xs, tx| {
            for (path, value) in &nodes {
                xs.write(tx, path, value)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Linux's `xen_drm_front_cfg_card`.
    fn read_config(&mut self) -> Result<()> {
        let be_alloc = self.xs.read(Tx::NONE, &format!("{}/be-alloc", self.dir))?;
        self.be_alloc = be_alloc.as_deref().map(str::trim) == Some("1");
        self.connectors.clear();
        for n in 0..MAX_CONNECTORS {
            let res = self
                .xs
                .read(Tx::NONE, &format!("{}/{n}/resolution", self.dir))?;
            let Some((width, height)) = res.as_deref().and_then(parse_resolution) else {
                break;
            };
            let unique_id = self
                .xs
                .read(Tx::NONE, &format!("{}/{n}/unique-id", self.dir))?
                .unwrap_or_default();
            self.connectors.push(ConnectorCfg {
                unique_id,
                width,
                height,
            });
        }
        if self.connectors.is_empty() {
            return Err(FrontError::Config(format!(
                "{}: no connector with a valid resolution",
                self.dir
            )));
        }
        Ok(())
    }

    /// One connector's request ring and event page, granted, with two unbound ports.
    fn alloc_rings(&mut self) -> Result<ConnRings> {
        let be = self.backend_id;
        let (req_page, req_ref) = self.grant_page()?;
        let (evt_page, evt_ref) = self.grant_page()?;
        let req_port = self.evtchn.alloc_unbound(be)?;
        let evt_port = self.evtchn.alloc_unbound(be)?;
        Ok(ConnRings {
            req: FrontRing::init(req_page),
            req_port,
            next_id: 0,
            evt: EventConsumer::init(evt_page),
            evt_port,
            events: VecDeque::new(),
            next_evt_id: 0,
            refs: [req_ref, evt_ref],
        })
    }

    /// One fresh page granted RW to the backend (`gnttab_grant_foreign_access`).
    fn grant_page(&mut self) -> Result<(MappedRegion, GrantRef)> {
        let mut granted = self.gntalloc.alloc(self.backend_id, 1, true)?;
        let gref = granted.refs.pop().ok_or_else(|| no_grant(1))?;
        Ok((granted.region, gref))
    }

    /// Grant every page of `pages` RW to the backend.
    fn grant(&self, pages: &SimPages) -> Result<Vec<GrantRef>> {
        let refs = self.mem.grant(pages, self.backend_id, false);
        if refs.len() != pages.pages() {
            return Err(no_grant(pages.pages()));
        }
        Ok(refs)
    }

    /// Drop every ring: unbind the ports and free the pages (their grants end once the
    /// backend has unmapped them, like Linux's deferred grant release).
    fn free_rings(&mut self) {
        for r in self.rings.drain(..) {
            for port in [r.req_port, r.evt_port] {
                if let Err(e) = self.evtchn.unbind(port) {
                    tracing::debug!("frontend: unbind {port:?}: {e}");
                }
            }
        }
    }

    /// `xenbus_switch_state`: write `state` unless the node is gone (device removed).
    fn switch_state(&mut self, state: XenbusState) -> Result<()> {
        let path = format!("{}/state", self.dir);
        let written = self.xs.transaction(|xs, tx| {
            if xs.read(tx, &path)?.is_none() {
                return Ok(false);
            }
            xs.write(tx, &path, state.as_str())?;
            Ok(true)
        })?;
        if written {
            self.state = state;
        }
        Ok(())
    }

    /// Driver unbind (`xen_drv_remove`): Closing, poll the backend state for up to 1 s
    /// for InitWait (or Closed), then Closed. Events are ignored until `restart`.
    pub fn close(&mut self) -> Result<()> {
        self.switch_state(XenbusState::Closing)?;
        self.unbound = true;
        let path = format!("{}/state", self.backend_dir);
        for _ in 0..UNBIND_POLLS {
            let bs = read_state(&mut self.xs, &path)?;
            self.backend_state = bs;
            if matches!(bs, XenbusState::InitWait | XenbusState::Closed) {
                break;
            }
            std::thread::sleep(UNBIND_POLL);
        }
        self.drm_present = false;
        self.free_rings();
        self.switch_state(XenbusState::Closed)
    }

    /// Guest reboot or driver reload: drop everything, write Initialising and handshake
    /// again when the backend is (back) in InitWait.
    pub fn restart(&mut self) -> Result<()> {
        self.drm_present = false;
        self.unbound = false;
        self.free_rings();
        self.switch_state(XenbusState::Initialising)?;
        let path = format!("{}/state", self.backend_dir);
        let bs = read_state(&mut self.xs, &path)?;
        self.backend_changed(bs)
    }

    // ---- rings ----

    fn rings_mut(&mut self, conn: u32) -> Result<&mut ConnRings> {
        self.rings
            .get_mut(conn as usize)
            .ok_or(FrontError::NotConnected(conn))
    }

    /// Drain every event page into its connector's queue; handle notifications.
    fn process_evtchn(&mut self) -> Result<()> {
        let mut ports = Vec::new();
        self.evtchn.pending(&mut ports)?;
        self.drain_events();
        Ok(())
    }

    fn drain_events(&mut self) {
        if self.opts.never_consume_events {
            return;
        }
        let mut slots = Vec::new();
        for r in &mut self.rings {
            r.evt.drain(&mut slots);
            r.events.extend(slots.drain(..).map(|s| decode_event(&s)));
        }
    }

    /// Send one request on `conn`'s ring and wait (3 s) for its response. Exactly one
    /// request is outstanding per ring, as in Linux.
    pub fn request(&mut self, conn: u32, req: Request) -> Result<wire::Resp> {
        let sent = self.send_requests(conn, &[req])?;
        self.response_to(conn, sent[0])
    }

    /// Put `reqs` on `conn`'s ring and publish them together (one notify), so that the
    /// backend finds them all in one look at the ring; then wait for their responses in
    /// order. Err on the first non-zero status.
    pub fn request_batch_ok(&mut self, conn: u32, reqs: &[Request]) -> Result<()> {
        for sent in self.send_requests(conn, reqs)? {
            let resp = self.response_to(conn, sent)?;
            if resp.status != 0 {
                return Err(FrontError::Status(resp.status));
            }
        }
        Ok(())
    }

    /// Encode `reqs` with the ring's next ids and publish them together: each one's
    /// (id, operation), for [`FrontendSim::response_to`].
    fn send_requests(&mut self, conn: u32, reqs: &[Request]) -> Result<Vec<(u16, u8)>> {
        let r = self.rings_mut(conn)?;
        let mut sent = Vec::with_capacity(reqs.len());
        let mut slots = Vec::with_capacity(reqs.len());
        for req in reqs {
            let id = r.next_id;
            r.next_id = r.next_id.wrapping_add(1);
            let slot = req.encode(id);
            sent.push((id, slot[2]));
            slots.push(slot);
        }
        self.publish(conn, &slots)?;
        Ok(sent)
    }

    /// Wait (3 s) for the next response on `conn`'s ring; it must answer request `id`
    /// of `operation`.
    fn response_to(&mut self, conn: u32, (id, operation): (u16, u8)) -> Result<wire::Resp> {
        let resp = self.wait_response_raw(conn, self.request_timeout)?;
        if resp.id != id || resp.operation != operation {
            return Err(FrontError::Protocol(format!(
                "response id {} operation {:#x} to request id {id} operation {operation:#x}",
                resp.id, resp.operation
            )));
        }
        Ok(resp)
    }

    /// Put one raw slot on `conn`'s ring and notify if the backend asked for it.
    pub fn send_raw(&mut self, conn: u32, slot: Slot) -> Result<()> {
        self.publish(conn, &[slot])
    }

    /// Put `slots` on `conn`'s ring, publish them with one index update and notify if
    /// the backend asked for it.
    fn publish(&mut self, conn: u32, slots: &[Slot]) -> Result<()> {
        let r = self.rings_mut(conn)?;
        for slot in slots {
            r.req.put_request(slot);
        }
        let port = r.req_port;
        if r.req.push_requests() {
            self.evtchn.notify(port)?;
        }
        Ok(())
    }

    /// Wait for the next response on `conn`'s ring, whatever it is.
    pub fn wait_response_raw(&mut self, conn: u32, timeout: Duration) -> Result<wire::Resp> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(slot) = self.rings_mut(conn)?.req.next_response() {
                return Ok(decode_response(&slot));
            }
            self.drain_events();
            let now = Instant::now();
            if now >= deadline {
                return Err(FrontError::Timeout(format!(
                    "a response on connector {conn} after {timeout:?}"
                )));
            }
            self.evtchn.wait(deadline - now)?;
        }
    }

    /// Write `n` requests (PG_FLIP of cookie 0) and set `req_prod` directly, beyond the
    /// ring size if `n > 32`, then notify: a broken frontend. The ring is unusable after.
    pub fn flood(&mut self, conn: u32, n: u32) -> Result<()> {
        let r = self.rings_mut(conn)?;
        let page = r.req.page();
        let prod = page.load_u32(ring::REQ_PROD);
        for i in 0..n {
            let idx = prod.wrapping_add(i);
            let slot = Request::PgFlip { fb_cookie: 0 }.encode(idx as u16);
            let offset = ring::SLOTS + (idx & (ring::SIZE - 1)) as usize * wire::SLOT_SIZE;
            page.write(offset, &slot)
                .map_err(|e| FrontError::Invalid(e.to_string()))?;
        }
        page.store_u32(ring::REQ_PROD, prod.wrapping_add(n));
        let port = r.req_port;
        self.evtchn.notify(port)?;
        Ok(())
    }

    /// Notify `conn`'s request port without queueing anything (spurious kick).
    pub fn kick(&mut self, conn: u32) -> Result<()> {
        let port = self.rings_mut(conn)?.req_port;
        self.evtchn.notify(port)?;
        Ok(())
    }

    /// A request whose non-zero status is an error.
    fn request_ok(&mut self, conn: u32, req: Request) -> Result<wire::Resp> {
        let resp = self.request(conn, req)?;
        if resp.status != 0 {
            return Err(FrontError::Status(resp.status));
        }
        Ok(resp)
    }

    // ---- buffers ----

    fn next_cookie(&mut self, base: u64) -> u64 {
        self.cookies += 1;
        base + self.cookies * 0x1000
    }

    /// Grant `pages` data pages (or none for be-alloc) and build their page directory.
    fn build_dir(
        &mut self,
        data_refs: &[GrantRef],
        num_refs: usize,
    ) -> Result<(SimPages, Vec<GrantRef>)> {
        let dir_pages = num_refs.div_ceil(pgdir::PER_PAGE).max(1);
        let dir = self.mem.alloc(dir_pages)?;
        let dir_refs = self.grant(&dir)?;
        let region = dir.region();
        for (i, chunk_start) in (0..dir_pages).map(|i| (i, i * pgdir::PER_PAGE)) {
            let base = i * PAGE_SIZE;
            let next = dir_refs.get(i + 1).map_or(0, |r| r.0);
            write_u32(region, base + pgdir::NEXT, next)?;
            let end = data_refs.len().min(chunk_start + pgdir::PER_PAGE);
            for (j, r) in data_refs[chunk_start.min(end)..end].iter().enumerate() {
                write_u32(region, base + pgdir::GREFS + 4 * j, r.0)?;
            }
        }
        Ok((dir, dir_refs))
    }

    /// A dumb buffer like Linux's `DRM_IOCTL_MODE_CREATE_DUMB`: frontend-allocated pages
    /// granted RW, a page directory, DBUF_CREATE on connector 0.
    pub fn create_dumb(&mut self, width: u32, height: u32, bpp: u32) -> Result<DumbBuf> {
        let (pitch, size) = dumb_geometry(width, height, bpp)?;
        let num_pages = (size as usize).div_ceil(PAGE_SIZE).max(1);
        let pages = self.mem.alloc(num_pages)?;
        let refs = self.grant(&pages)?;
        let (dir, dir_refs) = match self.build_dir(&refs, refs.len()) {
            Ok(d) => d,
            Err(e) => {
                self.free_granted(pages, &refs);
                return Err(e);
            }
        };
        let cookie = self.next_cookie(DBUF_COOKIE_BASE);
        let req = Request::DbufCreate {
            dbuf_cookie: cookie,
            width,
            height,
            bpp,
            buffer_sz: size,
            flags: 0,
            gref_directory: dir_refs[0].0,
            data_ofs: 0,
        };
        if let Err(e) = self.request_ok(0, req) {
            self.free_granted(pages, &refs);
            self.free_granted(dir, &dir_refs);
            return Err(e);
        }
        Ok(DumbBuf {
            cookie,
            width,
            height,
            bpp,
            pitch,
            size,
            refs,
            dir_refs,
            mem: BufMem::Local(pages),
            dir,
        })
    }

    /// A backend-allocated dumb buffer (`be-alloc=1`): only the directory is ours; after
    /// status 0 read the backend's grefs from it and map them.
    pub fn create_dumb_be_alloc(&mut self, width: u32, height: u32, bpp: u32) -> Result<DumbBuf> {
        let (pitch, size) = dumb_geometry(width, height, bpp)?;
        let num_pages = (size as usize).div_ceil(PAGE_SIZE).max(1);
        let (dir, dir_refs) = self.build_dir(&[], num_pages)?;
        let cookie = self.next_cookie(DBUF_COOKIE_BASE);
        let req = Request::DbufCreate {
            dbuf_cookie: cookie,
            width,
            height,
            bpp,
            buffer_sz: size,
            flags: wire::DBUF_FLG_REQ_ALLOC,
            gref_directory: dir_refs[0].0,
            data_ofs: 0,
        };
        if let Err(e) = self.request_ok(0, req) {
            self.free_granted(dir, &dir_refs);
            return Err(e);
        }
        let refs = read_dir(dir.region(), num_pages)?;
        let mapped = match self.mem.map_foreign(self.backend_id, &refs, true) {
            Ok(m) => m,
            Err(e) => {
                self.free_granted(dir, &dir_refs);
                return Err(e.into());
            }
        };
        Ok(DumbBuf {
            cookie,
            width,
            height,
            bpp,
            pitch,
            size,
            refs,
            dir_refs,
            mem: BufMem::Foreign(mapped),
            dir,
        })
    }

    /// Destroy a dumb buffer like Linux: (be-alloc: unmap first), DBUF_DESTROY on
    /// connector 0, then end foreign access to its grants. Local resources are freed even
    /// when the backend fails (as Linux does); grants still mapped are deferred.
    pub fn destroy_dumb(&mut self, buf: DumbBuf) -> Result<DestroyOutcome> {
        let DumbBuf {
            cookie,
            refs,
            dir_refs,
            mem,
            dir,
            ..
        } = buf;
        let local = match mem {
            BufMem::Foreign(mapped) => {
                drop(mapped);
                None
            }
            BufMem::Local(pages) => Some(pages),
        };
        let resp = self.request(
            0,
            Request::DbufDestroy {
                dbuf_cookie: cookie,
            },
        );
        let mut end_access_ok = true;
        if let Some(pages) = local {
            end_access_ok &= self.free_granted(pages, &refs);
        }
        end_access_ok &= self.free_granted(dir, &dir_refs);
        Ok(DestroyOutcome {
            status: resp?.status,
            end_access_ok,
        })
    }

    /// End access to `refs` and free `pages`; returns whether access ended at once
    /// (otherwise the release is deferred until the backend unmaps, as in Linux).
    fn free_granted(&self, pages: SimPages, refs: &[GrantRef]) -> bool {
        let ended = self.mem.end_access(refs);
        if let Err(e) = &ended {
            tracing::debug!("frontend: end access of {refs:?}: {e}; release deferred");
        }
        drop(pages);
        ended.is_ok()
    }

    /// FB_ATTACH on connector 0; returns the new framebuffer cookie.
    pub fn attach_fb(
        &mut self,
        buf: &DumbBuf,
        width: u32,
        height: u32,
        fourcc: u32,
    ) -> Result<u64> {
        let fb_cookie = self.next_cookie(FB_COOKIE_BASE);
        self.request_ok(
            0,
            Request::FbAttach {
                dbuf_cookie: buf.cookie,
                fb_cookie,
                width,
                height,
                pixel_format: fourcc,
            },
        )?;
        Ok(fb_cookie)
    }

    /// FB_DETACH on connector 0.
    pub fn detach_fb(&mut self, fb_cookie: u64) -> Result<()> {
        self.request_ok(0, Request::FbDetach { fb_cookie })
            .map(drop)
    }

    /// The SET_CONFIG request at x = y = 0; all zero disables the connector.
    pub fn config_request(fb_cookie: u64, width: u32, height: u32, bpp: u32) -> Request {
        Request::SetConfig {
            fb_cookie,
            x: 0,
            y: 0,
            width,
            height,
            bpp,
        }
    }

    /// SET_CONFIG on `conn` at x = y = 0; all zero disables the connector.
    pub fn set_config(
        &mut self,
        conn: u32,
        fb_cookie: u64,
        width: u32,
        height: u32,
        bpp: u32,
    ) -> Result<()> {
        self.request_ok(conn, Self::config_request(fb_cookie, width, height, bpp))
            .map(drop)
    }

    /// PG_FLIP on `conn`: Ok when the backend queued the flip (status 0).
    pub fn page_flip(&mut self, conn: u32, fb_cookie: u64) -> Result<()> {
        self.request_ok(conn, Request::PgFlip { fb_cookie })
            .map(drop)
    }

    /// Wait for the next event on `conn`: it must carry the next id, be a PG_FLIP and
    /// name `fb_cookie`.
    pub fn wait_flip_event(&mut self, conn: u32, fb_cookie: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain_events();
            let r = self.rings_mut(conn)?;
            if let Some(e) = r.events.pop_front() {
                let expected = r.next_evt_id;
                r.next_evt_id = expected.wrapping_add(1);
                if e.id != expected {
                    return Err(FrontError::Protocol(format!(
                        "event id {} on connector {conn}, expected {expected}",
                        e.id
                    )));
                }
                if e.type_ != wire::EVT_PG_FLIP || e.fb_cookie != fb_cookie {
                    return Err(FrontError::Protocol(format!(
                        "event type {} cookie {:#x} on connector {conn}, expected a flip of {fb_cookie:#x}",
                        e.type_, e.fb_cookie
                    )));
                }
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FrontError::Timeout(format!(
                    "the flip event of {fb_cookie:#x} on connector {conn}"
                )));
            }
            self.evtchn.wait(deadline - now)?;
        }
    }

    /// Events received on `conn` and not yet consumed by `wait_flip_event`.
    pub fn pending_events(&mut self, conn: u32) -> Result<usize> {
        self.drain_events();
        Ok(self.rings_mut(conn)?.events.len())
    }

    /// GET_EDID on `conn` with a 32 KiB buffer; returns the EDID bytes.
    pub fn get_edid(&mut self, conn: u32) -> Result<Vec<u8>> {
        self.get_edid_sized(conn, wire::EDID_MAX_SIZE, wire::EDID_MAX_SIZE)
    }

    /// GET_EDID on `conn` announcing `size` bytes in a buffer of `pages_bytes` bytes
    /// (rounded up to pages).
    pub fn get_edid_sized(&mut self, conn: u32, size: u32, pages_bytes: u32) -> Result<Vec<u8>> {
        let num_pages = (pages_bytes as usize).div_ceil(PAGE_SIZE).max(1);
        let pages = self.mem.alloc(num_pages)?;
        let refs = self.grant(&pages)?;
        let (dir, dir_refs) = match self.build_dir(&refs, refs.len()) {
            Ok(d) => d,
            Err(e) => {
                self.free_granted(pages, &refs);
                return Err(e);
            }
        };
        let resp = self.request_ok(
            conn,
            Request::GetEdid {
                buffer_sz: size,
                gref_directory: dir_refs[0].0,
            },
        );
        let result = resp.and_then(|r| {
            if r.edid_sz > size {
                return Err(FrontError::Protocol(format!(
                    "edid_sz {} exceeds the {size}-byte buffer",
                    r.edid_sz
                )));
            }
            let mut edid = vec![0u8; r.edid_sz as usize];
            pages
                .region()
                .read(0, &mut edid)
                .map_err(|e| FrontError::Invalid(e.to_string()))?;
            Ok(edid)
        });
        self.free_granted(pages, &refs);
        self.free_granted(dir, &dir_refs);
        result
    }
}

fn no_grant(pages: usize) -> FrontError {
    FrontError::Xen(XenError::Invalid(format!("could not grant {pages} pages")))
}

/// `ceil(width * bpp / 8)` and `pitch * height`, like Linux dumb buffers.
fn dumb_geometry(width: u32, height: u32, bpp: u32) -> Result<(u32, u32)> {
    let pitch = (u64::from(width) * u64::from(bpp)).div_ceil(8);
    let size = pitch * u64::from(height);
    match (u32::try_from(pitch), u32::try_from(size)) {
        (Ok(p), Ok(s)) if s > 0 => Ok((p, s)),
        _ => Err(FrontError::Invalid(format!(
            "dumb buffer {width}x{height}@{bpp}"
        ))),
    }
}

/// Parse `"<W>x<H>"` (both non-zero).
fn parse_resolution(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.trim().split_once('x')?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

fn write_u32(region: &MappedRegion, offset: usize, v: u32) -> Result<()> {
    region
        .write(offset, &v.to_ne_bytes())
        .map_err(|e| FrontError::Invalid(e.to_string()))
}

/// Read `n` grefs from a page directory laid out in consecutive pages of `region`.
fn read_dir(region: &MappedRegion, n: usize) -> Result<Vec<GrantRef>> {
    (0..n)
        .map(|i| {
            let off = (i / pgdir::PER_PAGE) * PAGE_SIZE + pgdir::GREFS + 4 * (i % pgdir::PER_PAGE);
            let mut b = [0u8; 4];
            region
                .read(off, &mut b)
                .map_err(|e| FrontError::Invalid(e.to_string()))?;
            Ok(GrantRef(u32::from_ne_bytes(b)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    use super::*;
    use crate::displif::format::PixelFormat;
    use crate::displif::request::{decode, encode_pg_flip_event, encode_response};
    use crate::displif::ring::{BackRing, EventProducer};
    use crate::sim::toolstack::{backend_dir, Toolstack};
    use crate::sim::xenstored::SimXenstored;
    use crate::xen::platform::GrantMapper;

    const BE: DomId = DomId(0);
    const FE: DomId = DomId(7);

    fn client(d: &SimXenstored, dom: DomId) -> XsClient {
        XsClient::from_stream(d.connect(dom.0).unwrap()).unwrap()
    }

    /// How the hand-rolled backend answers one request.
    #[derive(Clone, Copy)]
    enum Answer {
        /// Echo id and operation with this status; for PG_FLIP also send the event,
        /// with this event id offset (0 = correct).
        Status(i32, u16),
        /// Respond with a wrong id.
        WrongId,
        /// Never respond.
        Silent,
        /// Status 0, but keep the buffer mapped through DBUF_DESTROY (a buggy backend).
        KeepMapped,
    }

    /// A tiny backend: InitWait, maps connector 0's rings on Initialised, Connected, then
    /// answers requests per `answers` until stopped. `restart_after` requests it goes
    /// Initialising then InitWait again (a restarted backend) and reconnects.
    struct TestBackend {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<Vec<Request>>>,
    }

    impl TestBackend {
        fn spawn(
            sim: &SimXen,
            xsd: &SimXenstored,
            answers: Vec<Answer>,
            restart_after: Option<usize>,
        ) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let mut xs = client(xsd, BE);
            let mut evtchn = sim.evtchn(BE);
            let mapper = sim.grant_mapper(BE);
            let gntalloc = sim.gntalloc(BE);
            let thread = std::thread::spawn(move || {
                let bdir = backend_dir(BE, FE, 0);
                let fdir = format!("/local/domain/{FE}/device/vdispl/0");
                xs.watch(&bdir, "b").unwrap();
                xs.watch(&format!("{fdir}/state"), "f").unwrap();
                let mut seen = Vec::new();
                let mut bufs = std::collections::HashMap::new();
                let mut allocs = Vec::new();
                let mut answers = answers.into_iter();
                let wait_for = |xs: &mut XsClient, path: &str, want: XenbusState| loop {
                    if stop2.load(Ordering::Relaxed) {
                        return false;
                    }
                    if read_state(xs, path).unwrap() == want {
                        return true;
                    }
                    if xs.take_watch_events().unwrap().is_empty() {
                        wait_readable(&[xs.as_raw_fd()], Duration::from_millis(20)).unwrap();
                    }
                };
                'connection: loop {
                    // The toolstack creates the device with state 1; answer InitWait,
                    // then wait for the frontend's Initialised.
                    let bstate = format!("{bdir}/state");
                    if !wait_for(&mut xs, &bstate, XenbusState::Initialising) {
                        return seen;
                    }
                    xs.write(Tx::NONE, &bstate, "2").unwrap();
                    if !wait_for(&mut xs, &format!("{fdir}/state"), XenbusState::Initialised) {
                        return seen;
                    }
                    let rd = |xs: &mut XsClient, n: &str| -> u32 {
                        xs.read(Tx::NONE, &format!("{fdir}/0/{n}"))
                            .unwrap()
                            .unwrap()
                            .parse()
                            .unwrap()
                    };
                    let req_ref = GrantRef(rd(&mut xs, "req-ring-ref"));
                    let evt_ref = GrantRef(rd(&mut xs, "evt-ring-ref"));
                    let req_remote = EvtchnPort(rd(&mut xs, "req-event-channel"));
                    let evt_remote = EvtchnPort(rd(&mut xs, "evt-event-channel"));
                    let mut back = BackRing::new(mapper.map(FE, &[req_ref], true).unwrap());
                    let mut evts = EventProducer::new(mapper.map(FE, &[evt_ref], true).unwrap());
                    let req_port = evtchn.bind_interdomain(FE, req_remote).unwrap();
                    let evt_port = evtchn.bind_interdomain(FE, evt_remote).unwrap();
                    xs.write(Tx::NONE, &format!("{bdir}/state"), "4").unwrap();
                    let mut ports = Vec::new();
                    loop {
                        if stop2.load(Ordering::Relaxed) {
                            return seen;
                        }
                        loop {
                            let slot = match back.next_request() {
                                Ok(Some(slot)) => slot,
                                Ok(None) => break,
                                Err(_) => {
                                    // A broken ring: close like libxenbe (5, 6).
                                    xs.write(Tx::NONE, &format!("{bdir}/state"), "5").unwrap();
                                    xs.write(Tx::NONE, &format!("{bdir}/state"), "6").unwrap();
                                    return seen;
                                }
                            };
                            let env = decode(&slot);
                            seen.push(env.request);
                            if restart_after == Some(seen.len()) {
                                drop(back);
                                drop(evts);
                                evtchn.unbind(req_port).unwrap();
                                evtchn.unbind(evt_port).unwrap();
                                xs.write(Tx::NONE, &format!("{bdir}/state"), "1").unwrap();
                                continue 'connection;
                            }
                            let answer = answers.next().unwrap_or(Answer::Silent);
                            let (id, status, evt_shift) = match answer {
                                Answer::Status(s, shift) => (env.id, s, shift),
                                Answer::WrongId => (env.id.wrapping_add(1), 0, 0),
                                Answer::KeepMapped => (env.id, 0, 0),
                                Answer::Silent => continue,
                            };
                            let mut edid_sz = 0;
                            let dir_refs = |dir: u32, n: u32| {
                                let dir = mapper.map(FE, &[GrantRef(dir)], true).unwrap();
                                (dir_grefs_of(&dir, n), dir)
                            };
                            match env.request {
                                Request::DbufCreate {
                                    dbuf_cookie,
                                    buffer_sz,
                                    flags,
                                    gref_directory,
                                    ..
                                } if status == 0 => {
                                    let n = buffer_sz.div_ceil(4096);
                                    if flags & wire::DBUF_FLG_REQ_ALLOC != 0 {
                                        let dir = mapper
                                            .map(FE, &[GrantRef(gref_directory)], true)
                                            .unwrap();
                                        let g = gntalloc.alloc(FE, n as usize, true).unwrap();
                                        for (j, r) in g.refs.iter().enumerate() {
                                            write_u32(&dir, pgdir::GREFS + 4 * j, r.0).unwrap();
                                        }
                                        g.region.write(0, b"BEAL").unwrap();
                                        allocs.push(g);
                                    } else {
                                        let (refs, _dir) = dir_refs(gref_directory, n);
                                        bufs.insert(
                                            dbuf_cookie,
                                            mapper.map(FE, &refs, true).unwrap(),
                                        );
                                    }
                                }
                                Request::DbufDestroy { dbuf_cookie }
                                    if !matches!(answer, Answer::KeepMapped) =>
                                {
                                    bufs.remove(&dbuf_cookie);
                                }
                                Request::GetEdid { gref_directory, .. } if status == 0 => {
                                    let (refs, _dir) = dir_refs(gref_directory, 8);
                                    let buf = mapper.map(FE, &refs, true).unwrap();
                                    buf.write(0, &[0xab; 128]).unwrap();
                                    edid_sz = 128;
                                }
                                _ => {}
                            }
                            back.put_response(&encode_response(id, env.operation, status, edid_sz));
                            if back.push_responses() {
                                evtchn.notify(req_port).unwrap();
                            }
                            if let Request::PgFlip { fb_cookie } = env.request {
                                evts.push(|eid| {
                                    encode_pg_flip_event(eid.wrapping_add(evt_shift), fb_cookie)
                                })
                                .unwrap();
                                evtchn.notify(evt_port).unwrap();
                            }
                        }
                        if back.final_check_for_requests() {
                            continue;
                        }
                        evtchn.pending(&mut ports).unwrap();
                        if ports.is_empty() {
                            wait_readable(&[evtchn.as_raw_fd()], Duration::from_millis(20))
                                .unwrap();
                        }
                        ports.clear();
                    }
                }
            });
            TestBackend {
                stop,
                thread: Some(thread),
            }
        }

        /// Stop and return the requests seen.
        fn finish(mut self) -> Vec<Request> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for TestBackend {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn dir_grefs_of(dir: &MappedRegion, n: u32) -> Vec<GrantRef> {
        read_dir(dir, n as usize).unwrap()
    }

    struct World {
        sim: SimXen,
        xsd: SimXenstored,
    }

    fn world() -> World {
        World {
            sim: SimXen::new(),
            xsd: SimXenstored::new(),
        }
    }

    /// Toolstack adds the device (the backend must already run), frontend connects.
    fn connect(
        w: &World,
        answers: Vec<Answer>,
        restart_after: Option<usize>,
    ) -> (TestBackend, FrontendSim) {
        let be = TestBackend::spawn(&w.sim, &w.xsd, answers, restart_after);
        let mut ts = Toolstack::new(client(&w.xsd, BE));
        ts.add_vdispl(
            BE,
            FE,
            0,
            false,
            &[("Virtual-1".into(), 64, 32), ("x".into(), 8, 8)],
        )
        .unwrap();
        let mut fe = FrontendSim::new(&w.sim, client(&w.xsd, FE), FE, 0).unwrap();
        fe.wait_connected(Duration::from_secs(5)).unwrap();
        (be, fe)
    }

    #[test]
    fn handshake_publishes_rings_and_connects() {
        let w = world();
        let (be, mut fe) = connect(&w, vec![Answer::Status(0, 0)], None);
        assert_eq!(fe.state(), XenbusState::Connected);
        assert_eq!(fe.backend_state(), XenbusState::Connected);
        assert_eq!(
            fe.connectors(),
            &[
                ConnectorCfg {
                    unique_id: "Virtual-1".into(),
                    width: 64,
                    height: 32
                },
                ConnectorCfg {
                    unique_id: "x".into(),
                    width: 8,
                    height: 8
                }
            ]
        );
        let f = "/local/domain/7/device/vdispl/0";
        for n in 0..2 {
            for node in [
                "req-ring-ref",
                "req-event-channel",
                "evt-ring-ref",
                "evt-event-channel",
            ] {
                assert!(w.xsd.exists(&format!("{f}/{n}/{node}")), "{n}/{node}");
            }
        }
        assert!(
            !w.xsd.exists(&format!("{f}/version")),
            "Linux never writes version"
        );
        fe.page_flip(0, 0x1234).unwrap();
        fe.wait_flip_event(0, 0x1234, FRAME_DONE_TIMEOUT).unwrap();
        assert_eq!(be.finish(), vec![Request::PgFlip { fb_cookie: 0x1234 }]);
    }

    #[test]
    fn dumb_buffer_lifecycle_uses_page_directory_and_ends_access() {
        let w = world();
        let answers = vec![Answer::Status(0, 0); 4];
        let (be, mut fe) = connect(&w, answers, None);
        // 1000 x 3 x 24 bpp: pitch 3000, 9000 bytes, 3 pages.
        let buf = fe.create_dumb(1000, 3, 24).unwrap();
        assert_eq!((buf.pitch, buf.size, buf.refs.len()), (3000, 9000, 3));
        assert_eq!(buf.dir_refs.len(), 1);
        let fb = fe
            .attach_fb(&buf, 1000, 3, PixelFormat::Rgb888.fourcc())
            .unwrap();
        fe.detach_fb(fb).unwrap();
        let out = fe.destroy_dumb(buf).unwrap();
        assert_eq!(out.status, 0);
        assert!(out.end_access_ok, "nothing mapped the buffer");
        let seen = be.finish();
        assert!(matches!(
            seen[0],
            Request::DbufCreate {
                width: 1000,
                height: 3,
                bpp: 24,
                buffer_sz: 9000,
                flags: 0,
                data_ofs: 0,
                ..
            }
        ));
        assert!(matches!(seen[3], Request::DbufDestroy { .. }));
    }

    #[test]
    fn failing_status_is_reported_and_frees_the_buffer() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![Answer::Status(-22, 0)], None);
        let err = fe.create_dumb(16, 16, 32).err().unwrap();
        assert!(matches!(err, FrontError::Status(-22)), "{err}");
    }

    #[test]
    fn wrong_response_id_is_a_protocol_error() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![Answer::WrongId], None);
        let err = fe.page_flip(0, 1).unwrap_err();
        assert!(matches!(err, FrontError::Protocol(_)), "{err}");
    }

    #[test]
    fn unexpected_event_id_is_a_protocol_error() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![Answer::Status(0, 5)], None);
        fe.page_flip(0, 9).unwrap();
        let err = fe.wait_flip_event(0, 9, FRAME_DONE_TIMEOUT).unwrap_err();
        assert!(matches!(err, FrontError::Protocol(_)), "{err}");
    }

    #[test]
    fn silent_backend_times_out() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![Answer::Silent], None);
        fe.set_request_timeout(Duration::from_millis(200));
        let err = fe.page_flip(0, 1).unwrap_err();
        assert!(matches!(err, FrontError::Timeout(_)), "{err}");
    }

    #[test]
    fn backend_restart_reconnects() {
        let w = world();
        let (be, mut fe) = connect(&w, vec![Answer::Status(0, 0); 2], Some(1));
        // The backend restarts on this request instead of answering.
        fe.set_request_timeout(Duration::from_millis(300));
        assert!(fe.page_flip(0, 1).is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(fe.pump_until(deadline, |fe| fe.reconnects() == 1).unwrap());
        assert_eq!(fe.state(), XenbusState::Connected);
        // Event ids restart at 0 on the new connection.
        fe.page_flip(0, 2).unwrap();
        fe.wait_flip_event(0, 2, FRAME_DONE_TIMEOUT).unwrap();
        drop(be);
    }

    #[test]
    fn version_is_written_only_when_asked() {
        let w = world();
        let _be = TestBackend::spawn(&w.sim, &w.xsd, vec![], None);
        let mut ts = Toolstack::new(client(&w.xsd, BE));
        ts.add_vdispl(BE, FE, 0, false, &[("a".into(), 8, 8)])
            .unwrap();
        let opts = FrontOptions {
            write_version: Some("2".into()),
            ..FrontOptions::default()
        };
        let mut fe = FrontendSim::with_options(&w.sim, client(&w.xsd, FE), FE, 0, opts).unwrap();
        fe.wait_connected(Duration::from_secs(5)).unwrap();
        assert_eq!(
            w.xsd
                .read("/local/domain/7/device/vdispl/0/version")
                .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn close_goes_closing_then_closed() {
        let w = world();
        let (be, mut fe) = connect(&w, vec![], None);
        drop(be);
        let started = Instant::now();
        fe.close().unwrap();
        // Nobody answers Closing: Linux gives up after 1 s.
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(fe.state(), XenbusState::Closed);
        assert_eq!(
            w.xsd
                .read("/local/domain/7/device/vdispl/0/state")
                .as_deref(),
            Some("6")
        );
    }

    #[test]
    fn be_alloc_buffer_maps_backend_pages() {
        let w = world();
        let (be, mut fe) = connect(&w, vec![Answer::Status(0, 0); 2], None);
        let buf = fe.create_dumb_be_alloc(100, 20, 32).unwrap();
        assert!(buf.is_be_alloc());
        assert_eq!(buf.refs.len(), 2);
        let mut b = [0u8; 4];
        buf.region().read(0, &mut b).unwrap();
        assert_eq!(&b, b"BEAL", "the backend's pages are mapped");
        buf.draw_pattern(1, 0).unwrap();
        let out = fe.destroy_dumb(buf).unwrap();
        assert_eq!(
            out,
            DestroyOutcome {
                status: 0,
                end_access_ok: true
            }
        );
        let seen = be.finish();
        assert!(matches!(
            seen[0],
            Request::DbufCreate {
                flags: wire::DBUF_FLG_REQ_ALLOC,
                buffer_sz: 8000,
                ..
            }
        ));
    }

    #[test]
    fn destroy_reports_grants_the_backend_still_maps() {
        let w = world();
        let answers = vec![Answer::Status(0, 0), Answer::KeepMapped];
        let (_be, mut fe) = connect(&w, answers, None);
        let buf = fe.create_dumb(64, 64, 32).unwrap();
        buf.draw_pattern(0, 0).unwrap();
        let out = fe.destroy_dumb(buf).unwrap();
        assert_eq!(out.status, 0);
        assert!(!out.end_access_ok, "the backend replied before unmapping");
    }

    #[test]
    fn get_edid_reads_what_the_backend_wrote() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![Answer::Status(0, 0)], None);
        assert_eq!(fe.get_edid(0).unwrap(), vec![0xab; 128]);
    }

    #[test]
    fn flooding_the_ring_makes_the_backend_close_and_us_reinitialise() {
        let w = world();
        let (_be, mut fe) = connect(&w, vec![], None);
        fe.flood(0, 40).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(fe
            .pump_until(deadline, |fe| fe.backend_state() == XenbusState::Closed)
            .unwrap());
        // Linux's disconnect: Reconfiguring, free the rings, then Initialising.
        assert_eq!(fe.state(), XenbusState::Initialising);
        assert!(matches!(
            fe.page_flip(0, 1),
            Err(FrontError::NotConnected(0))
        ));
    }

    #[test]
    fn restart_handshakes_again() {
        let w = world();
        let (be, mut fe) = connect(&w, vec![], None);
        // Guest driver reload while a new backend instance starts over.
        drop(be);
        w.xsd.write("/local/domain/0/backend/vdispl/7/0/state", "1");
        let _be2 = TestBackend::spawn(&w.sim, &w.xsd, vec![Answer::Status(0, 0)], None);
        fe.restart().unwrap();
        fe.wait_connected(Duration::from_secs(5)).unwrap();
        assert_eq!(fe.reconnects(), 1);
        fe.page_flip(0, 5).unwrap();
        fe.wait_flip_event(0, 5, FRAME_DONE_TIMEOUT).unwrap();
    }
}
