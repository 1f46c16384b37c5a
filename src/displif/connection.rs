//! Request handling for one frontend device connection: display buffers, framebuffers
//! and connectors. Cookies and buffers belong to this connection only.
//!
//! Every request arrives as a decoded private copy; every field is validated here, and
//! every failure becomes a negative errno in the response plus a rate-limited log line.
//!
//! Zero-copy buffers ([`crate::zcopy`]) are never mapped: the output scans out the
//! guest's pages (exported as a dma-buf) or its own dumb buffer granted to the guest
//! (be-alloc). DBUF_DESTROY of an exported buffer must not be answered before gntdev
//! released the grants, which can take up to 2 s; [`Connection::serve`] hands that wait
//! back as [`Outcome::Deferred`] so the event loop can run it elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::log_limit::LogLimiter;
use crate::output::{
    ConnectorId, FbLayout, Frame, FrameSource, ImportId, ImportedFb, ImportedFrame, Output,
    OutputError,
};
use crate::xen::mem::MappedRegion;
use crate::xen::platform::{GrantAllocator, GrantMapper, GrantedPages, PAGE_SIZE};
use crate::xen::{DomId, GrantRef};
use crate::zcopy::policy::ZeroCopyPolicy;
use crate::zcopy::{BackendAllocBuffer, ZeroCopyBuffer, ZeroCopyGate, DEFAULT_RELEASE_TIMEOUT};

pub use super::budget::Limits;
use super::budget::{GuestBudget, Usage};
use super::format::PixelFormat;
use super::pgdir::{self, pages_for};
use super::request::Request;
use super::stats::{ConnStats, ScanoutPath};
use super::wire::DBUF_FLG_REQ_ALLOC;

/// A guest connector as configured in XenStore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorCfg {
    pub unique_id: String,
    pub width: u32,
    pub height: u32,
}

/// The outcome of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0 or a negative errno.
    pub status: i32,
    /// GET_EDID only.
    pub edid_sz: u32,
}

/// What became of a request: answered now, or waiting for a zero-copy buffer's release.
#[derive(Debug)]
pub enum Outcome {
    Done(Reply),
    /// Answer with [`PendingRelease::wait`]'s reply, off the event loop thread.
    Deferred(PendingRelease),
}

/// A DBUF_DESTROY of a zero-copy buffer that is off screen and no longer held by the
/// output; what is left is closing our dma-buf fd and waiting for gntdev's release.
#[derive(Debug)]
pub struct PendingRelease {
    dom: DomId,
    cookie: u64,
    buffer: ZeroCopyBuffer,
    timeout: Duration,
}

impl PendingRelease {
    /// Block (up to the release timeout) until the guest's grants are unmapped; the
    /// reply is 0 only if they are.
    pub fn wait(self) -> Reply {
        let status = match self.buffer.destroy(self.timeout) {
            Ok(()) => 0,
            Err(e) => {
                crate::warn_limited!(
                    dom = self.dom.0,
                    "DBUF_DESTROY {:#x}: zero-copy buffer {e}",
                    self.cookie
                );
                e.status()
            }
        };
        Reply { status, edid_sz: 0 }
    }
}

/// A handled request, before it becomes an [`Outcome`].
enum Handled {
    /// The GET_EDID size (0 for everything else).
    Reply(u32),
    Deferred(PendingRelease),
}

/// A refused request: positive errno and the reason for the log.
#[derive(Debug)]
struct Refusal {
    errno: i32,
    why: String,
}

fn refuse<T>(errno: i32, why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        errno,
        why: why.into(),
    })
}

/// Where a display buffer's pages come from.
enum BufferMem {
    /// The guest's pages, mapped through gntdev (copy path).
    Guest(MappedRegion),
    /// Our pages granted to the guest (be-alloc, copy path).
    Backend(GrantedPages),
    /// The guest's pages exported as a dma-buf and imported by the output (zero-copy).
    ZeroCopy {
        buffer: ZeroCopyBuffer,
        import: ImportId,
        /// The grants exported (our validated copy), for the copy path should the
        /// display refuse to scan the buffer out; shared with the output's
        /// [`crate::output::PixelSource`] of the import.
        refs: Arc<[GrantRef]>,
    },
    /// A dumb buffer of the output granted to the guest (be-alloc, zero-copy).
    BackendZeroCopy {
        buffer: BackendAllocBuffer,
        import: ImportId,
    },
}

impl BufferMem {
    /// The mapping the copy path reads, if any.
    fn mapping(&self) -> Option<&MappedRegion> {
        match self {
            BufferMem::Guest(m) => Some(m),
            BufferMem::Backend(g) => Some(&g.region),
            BufferMem::ZeroCopy { .. } | BufferMem::BackendZeroCopy { .. } => None,
        }
    }

    /// The output's import, for a zero-copy buffer.
    fn import(&self) -> Option<ImportId> {
        match self {
            BufferMem::ZeroCopy { import, .. } | BufferMem::BackendZeroCopy { import, .. } => {
                Some(*import)
            }
            BufferMem::Guest(_) | BufferMem::Backend(_) => None,
        }
    }

    /// Connection close: release in the DBUF_DESTROY order without waiting.
    fn close(self, dom: DomId, out: &mut dyn Output) {
        match self {
            BufferMem::ZeroCopy { buffer, import, .. } => {
                out.release_import(import);
                if let Err(e) = buffer.destroy(Duration::ZERO) {
                    info!(
                        dom = dom.0,
                        "zero-copy buffer not released at close ({e}); gntdev unmaps it when the last holder lets go"
                    );
                }
            }
            BufferMem::BackendZeroCopy { buffer, import } => {
                out.release_import(import);
                if let Err(e) = buffer.destroy() {
                    info!(dom = dom.0, "be-alloc buffer at close: {e}");
                }
            }
            BufferMem::Guest(_) | BufferMem::Backend(_) => {}
        }
    }
}

struct DisplayBuffer {
    mem: BufferMem,
    /// Bytes the buffer's pages hold (whole pages).
    len: usize,
    /// 0 for a buffer whose geometry arrives with FB_ATTACH (PRIME import).
    width: u32,
    height: u32,
    bpp: u32,
    data_ofs: u32,
    /// What the buffer is charged to the guest's budget.
    usage: Usage,
}

#[derive(Clone, Copy, Debug)]
struct Framebuffer {
    dbuf: u64,
    width: u32,
    height: u32,
    format: PixelFormat,
    pitch: u32,
    /// The output's framebuffer, for a zero-copy buffer.
    imported: Option<ImportedFb>,
}

/// What a connector shows: a framebuffer and the source rectangle of SET_CONFIG.
#[derive(Clone, Copy, Debug)]
struct Shown {
    fb: u64,
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

struct ConnectorState {
    id: ConnectorId,
    cfg: ConnectorCfg,
    shown: Option<Shown>,
    /// A flip answered while the output was still busy with the previous one: shown at
    /// the next refresh (latest wins; it is always `shown.fb`).
    queued: Option<u64>,
    /// Flips replaced while waiting, oldest first: reported done (never shown) right
    /// after the flip the output is showing, so events keep the order of the requests.
    superseded: Vec<u64>,
    /// SET_CONFIGs (possible modesets) allowed: a token bucket.
    configs: LogLimiter,
}

/// The state of one connected frontend device.
pub struct Connection {
    dom: DomId,
    grants: Arc<dyn GrantMapper>,
    gntalloc: Option<Arc<dyn GrantAllocator>>,
    /// The domain's budget, shared with its other devices.
    budget: Arc<GuestBudget>,
    /// What this connection has charged to `budget` (given back at close).
    charged: Usage,
    /// `be-alloc=1` in XenStore: the toolstack allows REQ_ALLOC.
    be_alloc: bool,
    dbufs: HashMap<u64, DisplayBuffer>,
    fbs: HashMap<u64, Framebuffer>,
    connectors: Vec<ConnectorState>,
    log: LogLimiter,
    /// Bytes copied or mapped since [`Connection::take_cost`] (the loop's turn budget).
    cost: u64,
    /// Flip events to send now: (connector, fb cookie) of superseded or dropped flips.
    events: Vec<(u32, u64)>,
    /// Refusals in the current one-second window, and when it started.
    refusals: (Instant, u32),
    /// Shared by every connection of the backend.
    zero_copy: Arc<Mutex<ZeroCopyGate>>,
    release_timeout: Duration,
    /// Flips and refusals, for `displback status`.
    stats: ConnStats,
    /// Zero-copy buffers moved to the copy path because the display refused their
    /// framebuffers (the first is logged as a warning, later ones rate-limited).
    imports_refused: u64,
}

impl Connection {
    /// A new connection whose connectors have already been added to the output.
    pub fn new(
        dom: DomId,
        dev: u32,
        connectors: Vec<ConnectorCfg>,
        grants: Arc<dyn GrantMapper>,
        gntalloc: Option<Arc<dyn GrantAllocator>>,
        limits: Limits,
    ) -> Self {
        let connectors = connectors
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| ConnectorState {
                id: ConnectorId {
                    dom,
                    dev,
                    idx: i as u32,
                },
                cfg,
                shown: None,
                queued: None,
                superseded: Vec::new(),
                configs: LogLimiter::new(8, f64::from(limits.max_configs_per_sec)),
            })
            .collect::<Vec<_>>();
        Connection {
            stats: ConnStats::new(connectors.len()),
            dom,
            grants,
            gntalloc,
            budget: GuestBudget::new(limits),
            charged: Usage::default(),
            be_alloc: false,
            dbufs: HashMap::new(),
            fbs: HashMap::new(),
            connectors,
            log: LogLimiter::default(),
            cost: 0,
            events: Vec::new(),
            refusals: (Instant::now(), 0),
            zero_copy: Arc::new(Mutex::new(ZeroCopyGate::off())),
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            imports_refused: 0,
        }
    }

    /// Charge everything to `budget` (the domain's, shared by its devices) instead of a
    /// budget of this connection's own.
    pub fn with_budget(mut self, budget: Arc<GuestBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Whether the toolstack allowed backend allocation (`be-alloc=1`): without it a
    /// DBUF_CREATE with REQ_ALLOC is refused with EINVAL.
    pub fn with_be_alloc(mut self, allowed: bool) -> Self {
        self.be_alloc = allowed;
        self
    }

    /// Use `gate` (shared by all connections) to decide on zero-copy per buffer.
    pub fn with_zero_copy(mut self, gate: Arc<Mutex<ZeroCopyGate>>) -> Self {
        self.zero_copy = gate;
        self
    }

    /// How long DBUF_DESTROY waits for a zero-copy buffer's release (default 2 s,
    /// below the guest's 3 s response timeout).
    pub fn with_release_timeout(mut self, timeout: Duration) -> Self {
        self.release_timeout = timeout;
        self
    }

    fn gate(&self) -> MutexGuard<'_, ZeroCopyGate> {
        // The gate holds only counters and flags: a panic elsewhere leaves it usable.
        self.zero_copy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes copied or mapped by the requests served since the last call: what the event
    /// loop weighs a turn by.
    pub fn take_cost(&mut self) -> u64 {
        std::mem::take(&mut self.cost)
    }

    /// Flip events to send now, oldest first: (connector index, fb cookie).
    pub fn take_flip_events(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.events)
    }

    /// True once this second's refusals are past [`Limits::max_refusals_per_sec`]: the
    /// guest keeps hitting its limits and its connection should be closed.
    pub fn misbehaving(&self) -> bool {
        self.refusals.1 > self.budget.limits().max_refusals_per_sec
            && self.refusals.0.elapsed() < Duration::from_secs(1)
    }

    fn count_refusal(&mut self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.refusals.0) >= Duration::from_secs(1) {
            self.refusals = (now, 0);
        }
        self.refusals.1 = self.refusals.1.saturating_add(1);
    }

    /// Number of live display buffers and framebuffers (tests, stats).
    pub fn counts(&self) -> (usize, usize) {
        (self.dbufs.len(), self.fbs.len())
    }

    /// Flips and refusals so far (`displback status`).
    pub fn stats(&self) -> &ConnStats {
        &self.stats
    }

    /// Each connector's configuration and how its current frame reaches the output
    /// (`None` while disabled).
    pub fn connector_paths(&self) -> Vec<(&ConnectorCfg, Option<ScanoutPath>)> {
        self.connectors
            .iter()
            .map(|c| {
                let path = c
                    .shown
                    .and_then(|s| self.fbs.get(&s.fb))
                    .and_then(|fb| self.dbufs.get(&fb.dbuf))
                    .map(|buf| match buf.mem {
                        BufferMem::Guest(_) => ScanoutPath::Copy,
                        BufferMem::Backend(_) => ScanoutPath::BeAlloc,
                        BufferMem::ZeroCopy { .. } => ScanoutPath::ZeroCopy,
                        BufferMem::BackendZeroCopy { .. } => ScanoutPath::BeAllocZeroCopy,
                    });
                (&c.cfg, path)
            })
            .collect()
    }

    /// Handle one request that arrived on connector `conn`'s ring, waiting for a
    /// zero-copy buffer's release in place (tests, tools; the server uses
    /// [`Connection::serve`]).
    pub fn handle(&mut self, conn: u32, req: Request, out: &mut dyn Output) -> Reply {
        match self.serve(conn, req, out) {
            Outcome::Done(reply) => reply,
            Outcome::Deferred(pending) => pending.wait(),
        }
    }

    /// Handle one request that arrived on connector `conn`'s ring. A DBUF_DESTROY of a
    /// zero-copy buffer comes back [`Outcome::Deferred`]: everything that needs the
    /// output is done, the blocking wait is left to the caller.
    pub fn serve(&mut self, conn: u32, req: Request, out: &mut dyn Output) -> Outcome {
        let result = self.dispatch(conn, req, out);
        match result {
            Ok(Handled::Reply(edid_sz)) => {
                if matches!(req, Request::PgFlip { .. }) {
                    self.stats.flip(conn);
                }
                Outcome::Done(Reply { status: 0, edid_sz })
            }
            Ok(Handled::Deferred(p)) => Outcome::Deferred(p),
            Err(r) => {
                self.count_refusal();
                self.stats.refused(format!("{req:?}"), r.errno, &r.why);
                if let Some(suppressed) = self.log.allow() {
                    warn!(
                        conn,
                        errno = r.errno,
                        suppressed,
                        refused = true,
                        "refused {req:?}: {}",
                        r.why
                    );
                }
                Outcome::Done(Reply {
                    status: -r.errno,
                    edid_sz: 0,
                })
            }
        }
    }

    fn dispatch(
        &mut self,
        conn: u32,
        req: Request,
        out: &mut dyn Output,
    ) -> Result<Handled, Refusal> {
        let Some(state) = self.connectors.get(conn as usize) else {
            return refuse(libc::EINVAL, format!("no connector {conn}"));
        };
        let conn_id = state.id;
        // Buffer operations are "not connector specific" and go on connector 0's ring.
        let buffer_op = matches!(
            req,
            Request::DbufCreate { .. }
                | Request::DbufDestroy { .. }
                | Request::FbAttach { .. }
                | Request::FbDetach { .. }
        );
        if buffer_op && conn != 0 {
            return refuse(
                libc::EINVAL,
                format!("buffer operation on connector {conn}'s ring"),
            );
        }
        let result = match req {
            Request::DbufCreate {
                dbuf_cookie,
                width,
                height,
                bpp,
                buffer_sz,
                flags,
                gref_directory,
                data_ofs,
            } => self
                .dbuf_create(
                    dbuf_cookie,
                    width,
                    height,
                    bpp,
                    buffer_sz,
                    flags,
                    gref_directory,
                    data_ofs,
                    out,
                )
                .map(|()| 0),
            Request::DbufDestroy { dbuf_cookie } => return self.dbuf_destroy(dbuf_cookie, out),
            Request::FbAttach {
                dbuf_cookie,
                fb_cookie,
                width,
                height,
                pixel_format,
            } => self
                .fb_attach(dbuf_cookie, fb_cookie, width, height, pixel_format, out)
                .map(|()| 0),
            Request::FbDetach { fb_cookie } => self.fb_detach(fb_cookie, out).map(|()| 0),
            Request::SetConfig {
                fb_cookie,
                x,
                y,
                width,
                height,
                bpp,
            } => self
                .set_config(
                    conn as usize,
                    conn_id,
                    fb_cookie,
                    x,
                    y,
                    width,
                    height,
                    bpp,
                    out,
                )
                .map(|()| 0),
            Request::PgFlip { fb_cookie } => self
                .page_flip(conn as usize, conn_id, fb_cookie, out)
                .map(|()| 0),
            Request::GetEdid {
                buffer_sz,
                gref_directory,
            } => self.get_edid(conn as usize, buffer_sz, gref_directory),
            Request::Unknown(code) => refuse(libc::ENOSYS, format!("unknown operation {code:#x}")),
        };
        result.map(Handled::Reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn dbuf_create(
        &mut self,
        cookie: u64,
        width: u32,
        height: u32,
        bpp: u32,
        buffer_sz: u32,
        flags: u32,
        gref_directory: u32,
        data_ofs: u32,
        out: &mut dyn Output,
    ) -> Result<(), Refusal> {
        if cookie == 0 {
            return refuse(libc::EINVAL, "display buffer cookie 0");
        }
        if self.dbufs.contains_key(&cookie) {
            return refuse(libc::EEXIST, format!("display buffer {cookie:#x} exists"));
        }
        if flags & !DBUF_FLG_REQ_ALLOC != 0 {
            return refuse(libc::EINVAL, format!("unknown flags {flags:#x}"));
        }
        if gref_directory == 0 {
            return refuse(libc::EINVAL, "page directory gref 0");
        }
        let bytes = u64::from(buffer_sz);
        if bytes == 0 || u64::from(data_ofs) >= bytes {
            return refuse(
                libc::EINVAL,
                format!("buffer_sz {buffer_sz} with data_ofs {data_ofs}"),
            );
        }
        let limits = *self.budget.limits();
        if bytes > limits.max_buffer_bytes {
            return refuse(
                libc::E2BIG,
                format!(
                    "buffer_sz {buffer_sz} over the {} limit",
                    limits.max_buffer_bytes
                ),
            );
        }
        let be_alloc = flags & DBUF_FLG_REQ_ALLOC != 0;
        if be_alloc && !self.be_alloc {
            return refuse(
                libc::EINVAL,
                "REQ_ALLOC, but the toolstack did not allow be-alloc for this device",
            );
        }
        if width != 0 || height != 0 || bpp != 0 {
            if width == 0 || height == 0 || !matches!(bpp, 8 | 16 | 24 | 32) {
                return refuse(libc::EINVAL, format!("geometry {width}x{height}@{bpp}"));
            }
            let pitch = (u64::from(width) * u64::from(bpp)).div_ceil(8);
            let need = pitch
                .checked_mul(u64::from(height))
                .and_then(|n| n.checked_add(u64::from(data_ofs)));
            if need.is_none_or(|n| n > bytes) {
                return refuse(
                    libc::EINVAL,
                    format!("{width}x{height}@{bpp} does not fit buffer_sz {buffer_sz}"),
                );
            }
        }
        let pages = pages_for(bytes) as usize;
        if be_alloc && (width == 0 || data_ofs != 0) {
            return refuse(
                libc::EINVAL,
                "backend allocation needs a geometry and data_ofs 0",
            );
        }
        // be-alloc pages are charged whole (they stay charged while the guest may map
        // them); guest pages cost a grant mapping each.
        let usage = if be_alloc {
            Usage {
                bytes: (pages * PAGE_SIZE) as u64,
                buffers: 1,
                ..Usage::default()
            }
        } else {
            Usage {
                bytes,
                buffers: 1,
                grant_mappings: pages,
                ..Usage::default()
            }
        };
        // Retained be-alloc pages the guest stopped mapping leave its budget; ones of
        // the right size serve this buffer (their charge moves to it).
        let mut reused = None;
        if be_alloc {
            if let Some(alloc) = self.gntalloc.clone() {
                self.budget.sweep(&*alloc);
                reused = self.budget.reuse(pages);
            }
        }
        if let Err(e) = self.budget.charge(usage) {
            if let Some(p) = reused {
                self.budget.put_back(p);
            }
            return refuse(libc::ENOMEM, e.to_string());
        }
        let made = if be_alloc {
            self.backend_buffer(width, height, bpp, pages, gref_directory, reused, out)
        } else {
            self.guest_buffer(pages, gref_directory, out)
        };
        let mem = match made {
            Ok(mem) => mem,
            Err(r) => {
                self.budget.uncharge(usage);
                return Err(r);
            }
        };
        self.cost += bytes;
        self.charged.add(&usage);
        debug!(
            zero_copy = mem.import().is_some(),
            "dbuf {cookie:#x}: {width}x{height}@{bpp}, {buffer_sz} bytes, {pages} pages"
        );
        self.dbufs.insert(
            cookie,
            DisplayBuffer {
                mem,
                len: pages * PAGE_SIZE,
                width,
                height,
                bpp,
                data_ofs,
                usage,
            },
        );
        Ok(())
    }

    /// The pages of a REQ_ALLOC buffer: a dumb buffer of the output (zero-copy), else
    /// gntalloc pages (`reused` retained ones first), their refs written into the
    /// guest's directory.
    #[allow(clippy::too_many_arguments)]
    fn backend_buffer(
        &mut self,
        width: u32,
        height: u32,
        bpp: u32,
        pages: usize,
        gref_directory: u32,
        reused: Option<GrantedPages>,
        out: &mut dyn Output,
    ) -> Result<BufferMem, Refusal> {
        let zero_copy = match self.backend_alloc_zero_copy(width, height, bpp, pages, out) {
            Ok(z) => z,
            Err(r) => {
                if let Some(p) = reused {
                    self.budget.put_back(p);
                }
                return Err(r);
            }
        };
        if let Some((buffer, import)) = zero_copy {
            if let Some(p) = reused {
                self.budget.put_back(p);
            }
            let written = pgdir::write_refs(&*self.grants, self.dom, gref_directory, buffer.refs());
            if let Err(e) = written {
                out.release_import(import);
                return refuse(e.errno(), e.to_string());
            }
            return Ok(BufferMem::BackendZeroCopy { buffer, import });
        }
        let Some(gntalloc) = self.gntalloc.clone() else {
            return refuse(
                libc::EOPNOTSUPP,
                "backend allocation unavailable (no gntalloc)",
            );
        };
        let granted = match reused {
            Some(p) => p,
            None => gntalloc.alloc(self.dom, pages, true).or_else(|e| {
                refuse(
                    e.errno().unwrap_or(libc::ENOMEM),
                    format!("allocating {pages} pages: {e}"),
                )
            })?,
        };
        if let Err(e) = pgdir::write_refs(&*self.grants, self.dom, gref_directory, &granted.refs) {
            // Never handed out by this request, but possibly by an earlier one.
            self.budget.put_back(granted);
            return refuse(e.errno(), e.to_string());
        }
        Ok(BufferMem::Backend(granted))
    }

    /// The pages of a guest-allocated buffer: exported as a dma-buf (zero-copy), else
    /// mapped for the copy path.
    fn guest_buffer(
        &mut self,
        pages: usize,
        gref_directory: u32,
        out: &mut dyn Output,
    ) -> Result<BufferMem, Refusal> {
        let refs = pgdir::read_refs(&*self.grants, self.dom, gref_directory, pages)
            .or_else(|e| refuse(e.errno(), e.to_string()))?;
        if let Some(mem) = self.export_zero_copy(&refs, out)? {
            return Ok(mem);
        }
        let mem = self
            .grants
            .map(self.dom, &refs, false)
            .or_else(|e| refuse(libc::EINVAL, format!("mapping {pages} buffer pages: {e}")))?;
        Ok(BufferMem::Guest(mem))
    }

    /// A guest-allocated buffer: exported and imported by the output (zero-copy), or
    /// `None` for the copy path. Only a `--zero-copy on` failure refuses the request.
    fn export_zero_copy(
        &mut self,
        refs: &[GrantRef],
        out: &mut dyn Output,
    ) -> Result<Option<BufferMem>, Refusal> {
        let (exported, policy) = {
            let mut gate = self.gate();
            (gate.export(self.dom, refs), gate.policy())
        };
        let exported =
            exported.or_else(|e| refuse(e.raw_errno(), format!("zero-copy export: {e}")))?;
        let Some(exported) = exported else {
            return Ok(None);
        };
        let buffer = ZeroCopyBuffer::new(exported);
        match out.import_dmabuf(buffer.dmabuf()) {
            Ok(import) => {
                let refs: Arc<[GrantRef]> = refs.into();
                let (grants, dom, shared) = (Arc::clone(&self.grants), self.dom, Arc::clone(&refs));
                out.set_import_pixels(
                    import,
                    Box::new(move || {
                        grants
                            .map(dom, &shared, false)
                            .map_err(std::io::Error::other)
                    }),
                );
                Ok(Some(BufferMem::ZeroCopy {
                    buffer,
                    import,
                    refs,
                }))
            }
            Err(e) if policy == ZeroCopyPolicy::On => refuse(
                e.errno(),
                format!("the output cannot import the dma-buf: {e}"),
            ),
            Err(e) => {
                // Our fd is the only holder: dropping it releases the export at once.
                if let Some(suppressed) = self.log.allow() {
                    info!(
                        suppressed,
                        "the output cannot import a dma-buf ({e}); copying this buffer"
                    );
                }
                Ok(None)
            }
        }
    }

    /// be-alloc: a dumb buffer of the output granted to the guest (zero-copy), or `None`
    /// for gntalloc pages and the copy path.
    fn backend_alloc_zero_copy(
        &mut self,
        width: u32,
        height: u32,
        bpp: u32,
        pages: usize,
        out: &mut dyn Output,
    ) -> Result<Option<(BackendAllocBuffer, ImportId)>, Refusal> {
        let pitch = (u64::from(width) * u64::from(bpp)).div_ceil(8) as u32;
        let mut import = None;
        let result = self.gate().backend_alloc(self.dom, pages, pitch, || {
            let (id, dumb) = out
                .create_dumb(width, height, bpp)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            import = Some(id);
            Ok(dumb)
        });
        match (result, import) {
            (Ok(Some(buffer)), Some(id)) => Ok(Some((buffer, id))),
            (result, id) => {
                // The dumb buffer (if any) is gone with the failed attempt.
                if let Some(id) = id {
                    out.release_import(id);
                }
                match result {
                    Err(e) => refuse(e.errno(), format!("zero-copy backend allocation: {e}")),
                    Ok(_) => Ok(None),
                }
            }
        }
    }

    fn dbuf_destroy(&mut self, cookie: u64, out: &mut dyn Output) -> Result<Handled, Refusal> {
        let Some(buf) = self.dbufs.remove(&cookie) else {
            return refuse(libc::ENOENT, format!("no display buffer {cookie:#x}"));
        };
        // Framebuffers on this buffer go with it; outputs hold copies, never the mapping.
        let orphans: Vec<u64> = self
            .fbs
            .iter()
            .filter(|(_, fb)| fb.dbuf == cookie)
            .map(|(c, _)| *c)
            .collect();
        for fb in orphans {
            debug!("fb {fb:#x} detached implicitly with its buffer");
            self.forget_fb(fb, out);
        }
        let Some(mem) = self.uncharge_buffer(buf.usage, buf.mem) else {
            return Ok(Handled::Reply(0));
        };
        match mem {
            BufferMem::ZeroCopy { buffer, import, .. } => {
                // Off screen, framebuffers and GEM handle now (the output lives on this
                // thread); closing our fd and waiting for gntdev's release is deferred.
                out.release_import(import);
                Ok(Handled::Deferred(PendingRelease {
                    dom: self.dom,
                    cookie,
                    buffer,
                    timeout: self.release_timeout,
                }))
            }
            BufferMem::BackendZeroCopy { buffer, import } => {
                // The guest unmapped before asking: nothing to wait for.
                out.release_import(import);
                buffer
                    .destroy()
                    .or_else(|e| refuse(-e.status(), format!("destroying {cookie:#x}: {e}")))?;
                Ok(Handled::Reply(0))
            }
            // Dropping a mapping unmaps the guest's pages before we answer.
            BufferMem::Guest(_) | BufferMem::Backend(_) => Ok(Handled::Reply(0)),
        }
    }

    /// A buffer leaves the connection: give its charge back and return what is left to
    /// release. gntalloc pages (be-alloc copy path) stay charged to the domain while the
    /// guest may still map them ([`GuestBudget::release_or_retain`]): `None`.
    fn uncharge_buffer(&mut self, usage: Usage, mem: BufferMem) -> Option<BufferMem> {
        self.charged.sub(&usage);
        match mem {
            BufferMem::Backend(granted) => {
                self.budget.uncharge(Usage { bytes: 0, ..usage });
                match self.gntalloc.clone() {
                    Some(alloc) => self.budget.release_or_retain(&*alloc, granted, usage.bytes),
                    None => self.budget.uncharge(Usage::bytes(usage.bytes)),
                }
                None
            }
            mem => {
                self.budget.uncharge(usage);
                Some(mem)
            }
        }
    }

    fn fb_attach(
        &mut self,
        dbuf: u64,
        cookie: u64,
        width: u32,
        height: u32,
        fourcc: u32,
        out: &mut dyn Output,
    ) -> Result<(), Refusal> {
        if cookie == 0 {
            return refuse(libc::EINVAL, "framebuffer cookie 0");
        }
        if self.fbs.contains_key(&cookie) {
            return refuse(libc::EEXIST, format!("framebuffer {cookie:#x} exists"));
        }
        let Some(buf) = self.dbufs.get(&dbuf) else {
            return refuse(libc::ENOENT, format!("no display buffer {dbuf:#x}"));
        };
        let Some(format) = PixelFormat::from_fourcc(fourcc) else {
            return refuse(
                libc::EINVAL,
                format!("unsupported pixel format {fourcc:#010x}"),
            );
        };
        if width == 0 || height == 0 {
            return refuse(libc::EINVAL, format!("framebuffer {width}x{height}"));
        }
        let Some(min_pitch) = format.min_pitch(width) else {
            return refuse(libc::EINVAL, format!("width {width} overflows"));
        };
        // No pitch travels in the protocol: it is the dumb-buffer pitch of the buffer's
        // own geometry, or of the framebuffer's for a buffer created without one.
        let pitch = if buf.width != 0 {
            if width > buf.width || height > buf.height {
                return refuse(
                    libc::EINVAL,
                    format!(
                        "fb {width}x{height} larger than buffer {}x{}",
                        buf.width, buf.height
                    ),
                );
            }
            (u64::from(buf.width) * u64::from(buf.bpp)).div_ceil(8) as u32
        } else {
            min_pitch
        };
        if pitch < min_pitch {
            return refuse(
                libc::EINVAL,
                format!("{format:?} at width {width} needs pitch {min_pitch}, buffer has {pitch}"),
            );
        }
        let need = u64::from(buf.data_ofs) + u64::from(pitch) * u64::from(height);
        if need > buf.len as u64 {
            return refuse(
                libc::EINVAL,
                format!("fb needs {need} bytes, buffer has {}", buf.len),
            );
        }
        let import = buf.mem.import();
        let data_ofs = buf.data_ofs;
        let one = Usage {
            fbs: 1,
            ..Usage::default()
        };
        self.budget
            .charge(one)
            .or_else(|e| refuse(libc::ENOMEM, e.to_string()))?;
        let imported = match import {
            Some(import) => {
                let layout = FbLayout {
                    width,
                    height,
                    format,
                    pitch,
                    offset: data_ofs,
                };
                match out.add_imported_fb(import, &layout) {
                    Ok(fb) => Some(fb),
                    Err(e) => {
                        self.budget.uncharge(one);
                        return refuse(
                            e.errno(),
                            format!("framebuffer of a zero-copy buffer: {e}"),
                        );
                    }
                }
            }
            None => None,
        };
        self.charged.add(&one);
        self.fbs.insert(
            cookie,
            Framebuffer {
                dbuf,
                width,
                height,
                format,
                pitch,
                imported,
            },
        );
        Ok(())
    }

    fn forget_fb(&mut self, cookie: u64, out: &mut dyn Output) {
        let Some(fb) = self.fbs.remove(&cookie) else {
            return;
        };
        let one = Usage {
            fbs: 1,
            ..Usage::default()
        };
        self.budget.uncharge(one);
        self.charged.sub(&one);
        if let Some(id) = fb.imported {
            out.remove_imported_fb(id);
        }
        for c in &mut self.connectors {
            if c.shown.is_some_and(|s| s.fb == cookie) {
                c.shown = None;
            }
            // A flip of it still waiting for its refresh will never be shown.
            if c.queued == Some(cookie) {
                c.queued = None;
                c.superseded.push(cookie);
            }
        }
    }

    fn fb_detach(&mut self, cookie: u64, out: &mut dyn Output) -> Result<(), Refusal> {
        if !self.fbs.contains_key(&cookie) {
            return refuse(libc::ENOENT, format!("no framebuffer {cookie:#x}"));
        }
        self.forget_fb(cookie, out);
        Ok(())
    }

    /// The frame to show for `shown`, clipped to the connector.
    fn frame(&self, conn: usize, shown: Shown) -> Result<FrameSource<'_>, Refusal> {
        let Some(fb) = self.fbs.get(&shown.fb) else {
            return refuse(libc::ENOENT, format!("no framebuffer {:#x}", shown.fb));
        };
        let buf = &self.dbufs[&fb.dbuf];
        let cfg = &self.connectors[conn].cfg;
        let (width, height) = (shown.width.min(cfg.width), shown.height.min(cfg.height));
        if let Some(id) = fb.imported {
            return Ok(FrameSource::Imported(ImportedFrame {
                fb: id,
                x: shown.x,
                y: shown.y,
                width,
                height,
                format: fb.format,
                fb_cookie: shown.fb,
            }));
        }
        let Some(mem) = buf.mem.mapping() else {
            return refuse(libc::EINVAL, "zero-copy buffer without a framebuffer");
        };
        let bytes_pp = fb.format.bpp() / 8;
        let offset = u64::from(buf.data_ofs)
            + u64::from(shown.y) * u64::from(fb.pitch)
            + u64::from(shown.x) * u64::from(bytes_pp);
        Ok(FrameSource::Mapped(Frame {
            mem,
            offset: offset as usize,
            width,
            height,
            pitch: fb.pitch,
            format: fb.format,
            fb_cookie: shown.fb,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn set_config(
        &mut self,
        conn: usize,
        conn_id: ConnectorId,
        fb_cookie: u64,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        bpp: u32,
        out: &mut dyn Output,
    ) -> Result<(), Refusal> {
        // Each SET_CONFIG may be a modeset, which the output may do synchronously.
        if self.connectors[conn].configs.allow().is_none() {
            return refuse(
                libc::EBUSY,
                format!(
                    "SET_CONFIG rate over {} per second",
                    self.budget.limits().max_configs_per_sec
                ),
            );
        }
        // Flips waiting for their refresh are older than this config: done now.
        let c = &mut self.connectors[conn];
        let waiting = c.superseded.drain(..).chain(c.queued.take());
        self.events
            .extend(waiting.map(|cookie| (conn as u32, cookie)));
        if fb_cookie == 0 && x == 0 && y == 0 && width == 0 && height == 0 && bpp == 0 {
            self.connectors[conn].shown = None;
            return out
                .set_config(conn_id, None)
                .or_else(|e| refuse(e.errno(), e.to_string()));
        }
        let Some(fb) = self.fbs.get(&fb_cookie).copied() else {
            return refuse(libc::ENOENT, format!("no framebuffer {fb_cookie:#x}"));
        };
        if bpp != fb.format.bpp() {
            return refuse(
                libc::EINVAL,
                format!("bpp {bpp} does not match {:?}", fb.format),
            );
        }
        let fits = |o: u32, len: u32, max: u32| {
            len != 0 && o.checked_add(len).is_some_and(|end| end <= max)
        };
        if !fits(x, width, fb.width) || !fits(y, height, fb.height) {
            return refuse(
                libc::EINVAL,
                format!(
                    "{width}x{height}+{x}+{y} outside fb {}x{}",
                    fb.width, fb.height
                ),
            );
        }
        if fb.format == PixelFormat::Yuyv && x % 2 != 0 {
            return refuse(libc::EINVAL, "YUYV source x must be even");
        }
        let shown = Shown {
            fb: fb_cookie,
            x,
            y,
            width,
            height,
        };
        let cost = self.show(conn, conn_id, shown, true, out)?;
        self.cost += cost;
        self.connectors[conn].shown = Some(shown);
        Ok(())
    }

    fn page_flip(
        &mut self,
        conn: usize,
        conn_id: ConnectorId,
        fb_cookie: u64,
        out: &mut dyn Output,
    ) -> Result<(), Refusal> {
        if !self.fbs.contains_key(&fb_cookie) {
            return refuse(libc::ENOENT, format!("no framebuffer {fb_cookie:#x}"));
        }
        let Some(current) = self.connectors[conn].shown else {
            return refuse(libc::EINVAL, "page flip on a disabled connector");
        };
        let fb = self.fbs[&fb_cookie];
        // A flip keeps the configured source rectangle; the new fb must cover it.
        if current.x + current.width > fb.width || current.y + current.height > fb.height {
            return refuse(
                libc::EINVAL,
                format!(
                    "fb {}x{} smaller than the configured area",
                    fb.width, fb.height
                ),
            );
        }
        let shown = Shown {
            fb: fb_cookie,
            ..current
        };
        // Latest wins, paced by the output's refresh: while the previous flip is not
        // shown yet, this one waits (replacing and completing any flip waiting before
        // it) and nothing is copied until the output can take it.
        if out.flip_busy(conn_id) {
            let c = &mut self.connectors[conn];
            c.shown = Some(shown);
            if let Some(old) = c.queued.replace(fb_cookie) {
                if c.superseded.len() >= MAX_SUPERSEDED {
                    // A guest flooding faster than it can be told: its oldest events go.
                    c.superseded.remove(0);
                }
                c.superseded.push(old);
            }
            return Ok(());
        }
        let cost = self.show(conn, conn_id, shown, false, out)?;
        self.cost += cost;
        self.connectors[conn].shown = Some(shown);
        Ok(())
    }

    /// Hand `shown` to the output: SET_CONFIG (`config`) or PG_FLIP. A zero-copy buffer
    /// whose framebuffer the display refuses ([`OutputError::ImportRefused`]: the
    /// driver took the import and AddFB2 but not the commit, which changed nothing)
    /// moves to the copy path, that buffer alone, and the frame goes again, copied.
    /// Returns the bytes copied (the turn budget's cost).
    fn show(
        &mut self,
        conn: usize,
        conn_id: ConnectorId,
        shown: Shown,
        config: bool,
        out: &mut dyn Output,
    ) -> Result<u64, Refusal> {
        for _ in 0..2 {
            let result = {
                let frame = self.frame(conn, shown)?;
                let cost = frame_cost(&frame);
                let r = if config {
                    out.set_config(conn_id, Some(&frame))
                } else {
                    out.page_flip(conn_id, &frame)
                };
                r.map(|()| cost)
            };
            match result {
                Ok(cost) => return Ok(cost),
                Err(OutputError::ImportRefused(e)) => self.copy_refused_buffer(shown.fb, e, out)?,
                Err(e) => return refuse(e.errno(), e.to_string()),
            }
        }
        refuse(libc::EIO, "the output refused a copied frame as an import")
    }

    /// The display refused to scan out framebuffer `fb_cookie`'s zero-copy buffer
    /// (`why`): map its grants for the copy path, drop the output's framebuffers and
    /// import of it and our export. Other buffers keep zero-copy. A be-alloc
    /// zero-copy buffer (pages of the output's own dumb buffer) has no copy path: the
    /// request fails with the driver's errno.
    fn copy_refused_buffer(
        &mut self,
        fb_cookie: u64,
        why: std::io::Error,
        out: &mut dyn Output,
    ) -> Result<(), Refusal> {
        let errno = why.raw_os_error().unwrap_or(libc::EIO);
        let Some(dbuf) = self.fbs.get(&fb_cookie).map(|f| f.dbuf) else {
            return refuse(libc::ENOENT, format!("no framebuffer {fb_cookie:#x}"));
        };
        let refs = match self.dbufs.get(&dbuf).map(|b| &b.mem) {
            Some(BufferMem::ZeroCopy { refs, .. }) => refs,
            _ => {
                return refuse(
                    errno,
                    format!("the display refuses buffer {dbuf:#x} and it has no copy path: {why}"),
                )
            }
        };
        let mapped = self.grants.map(self.dom, refs, false).or_else(|e| {
            refuse(
                libc::EINVAL,
                format!("mapping the pages of zero-copy buffer {dbuf:#x} the display refused: {e}"),
            )
        })?;
        for fb in self.fbs.values_mut().filter(|f| f.dbuf == dbuf) {
            if let Some(id) = fb.imported.take() {
                out.remove_imported_fb(id);
            }
        }
        let Some(buf) = self.dbufs.get_mut(&dbuf) else {
            return refuse(libc::ENOENT, format!("no buffer {dbuf:#x}"));
        };
        let old = std::mem::replace(&mut buf.mem, BufferMem::Guest(mapped));
        old.close(self.dom, out);
        self.imports_refused += 1;
        if self.imports_refused == 1 {
            warn!(
                dom = self.dom.0,
                "the display refuses to scan out zero-copy buffer {dbuf:#x} ({why}); \
                 copying this buffer, zero-copy stays on for the others"
            );
        } else if let Some(suppressed) = self.log.allow() {
            info!(
                dom = self.dom.0,
                suppressed,
                refused = self.imports_refused,
                "copying zero-copy buffer {dbuf:#x}: the display refuses it ({why})"
            );
        }
        Ok(())
    }

    /// Zero-copy buffers moved to the copy path because the display refused them.
    pub fn imports_refused(&self) -> u64 {
        self.imports_refused
    }

    /// True if a flip of this connection waits for its refresh.
    pub fn has_queued_flips(&self) -> bool {
        self.connectors
            .iter()
            .any(|c| c.queued.is_some() || !c.superseded.is_empty())
    }

    /// Hand the output each waiting flip it can take now (its previous flip is shown).
    /// A flip the output refuses now is reported done (the guest had status 0 for it).
    pub fn submit_queued(&mut self, out: &mut dyn Output) {
        for idx in 0..self.connectors.len() {
            let c = &mut self.connectors[idx];
            if out.flip_busy(c.id) {
                continue;
            }
            let id = c.id;
            self.events
                .extend(c.superseded.drain(..).map(|cookie| (idx as u32, cookie)));
            let Some(cookie) = c.queued.take() else {
                continue;
            };
            let shown = match self.connectors[idx].shown {
                Some(s) if s.fb == cookie => s,
                _ => {
                    self.events.push((idx as u32, cookie));
                    continue;
                }
            };
            let result = self.show(idx, id, shown, false, out).map_err(|r| r.why);
            match result {
                Ok(cost) => self.cost += cost,
                Err(why) => {
                    self.events.push((idx as u32, cookie));
                    if let Some(suppressed) = self.log.allow() {
                        warn!(
                            conn = idx,
                            suppressed, "queued flip of {cookie:#x} not shown: {why}"
                        );
                    }
                }
            }
        }
    }

    fn get_edid(
        &mut self,
        conn: usize,
        buffer_sz: u32,
        gref_directory: u32,
    ) -> Result<u32, Refusal> {
        let edid = super::edid::edid_for(
            self.connectors[conn].cfg.width,
            self.connectors[conn].cfg.height,
            60,
        );
        // displif.h only asks for at least XENDISPL_EDID_MAX_SIZE: any buffer that holds
        // the EDID is fine, and only the pages the EDID needs are looked at.
        if (buffer_sz as usize) < edid.len() {
            return refuse(libc::EINVAL, format!("EDID buffer_sz {buffer_sz}"));
        }
        let pages = pages_for(edid.len() as u64) as usize;
        let refs = pgdir::read_refs(&*self.grants, self.dom, gref_directory, pages)
            .or_else(|e| refuse(e.errno(), e.to_string()))?;
        // Only the first page receives the 128-byte block.
        let page = self
            .grants
            .map(self.dom, &refs[..1], true)
            .or_else(|e| refuse(libc::EINVAL, format!("mapping the EDID buffer: {e}")))?;
        page.write(0, &edid).expect("128 bytes fit a page");
        Ok(edid.len() as u32)
    }

    /// Tear down: forget every connector on the output, unmap every buffer.
    pub fn close(&mut self, out: &mut dyn Output) {
        for c in &self.connectors {
            out.remove_connector(c.id);
        }
        let (dbufs, fbs) = self.counts();
        if dbufs + fbs > 0 {
            info!("closing with {dbufs} display buffers and {fbs} framebuffers live");
        }
        // The output's imports go with their buffers (framebuffers included).
        self.fbs.clear();
        let bufs: Vec<DisplayBuffer> = self.dbufs.drain().map(|(_, b)| b).collect();
        for buf in bufs {
            if let Some(mem) = self.uncharge_buffer(buf.usage, buf.mem) {
                mem.close(self.dom, out);
            }
        }
        for c in &mut self.connectors {
            c.queued = None;
            c.superseded.clear();
        }
        self.events.clear();
        // Framebuffers (and anything not given back above) leave the domain's budget.
        self.budget.uncharge(std::mem::take(&mut self.charged));
    }
}

/// Superseded flips remembered per connector (their events are sent in order).
const MAX_SUPERSEDED: usize = 256;

/// What showing `frame` costs the loop: the bytes a copy reads (an import costs none).
fn frame_cost(frame: &FrameSource<'_>) -> u64 {
    match frame {
        FrameSource::Mapped(f) => u64::from(f.pitch) * u64::from(f.height),
        FrameSource::Imported(_) => 0,
    }
}

const _: () = assert!(PAGE_SIZE == 4096);
