//! Request handling for one frontend device connection: display buffers, framebuffers
//! and connectors. Cookies and buffers belong to this connection only.
//!
//! Every request arrives as a decoded private copy; every field is validated here, and
//! every failure becomes a negative errno in the response plus a rate-limited log line.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::backend::mem::MappedRegion;
use crate::backend::xen::{GrantAllocator, GrantMapper, GrantedPages, PAGE_SIZE};
use crate::backend::DomId;
use crate::log_limit::LogLimiter;
use crate::output::{ConnectorId, Frame, Output};

use super::format::PixelFormat;
use super::pgdir::{self, pages_for};
use super::request::Request;
use super::wire::{DBUF_FLG_REQ_ALLOC, EDID_MAX_SIZE};

/// Guest-independent caps on what one connection may make us map or allocate.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest single display buffer (bytes).
    pub max_buffer_bytes: u64,
    /// All display buffers of one connection together (bytes).
    pub max_total_bytes: u64,
    /// Display buffers per connection.
    pub max_buffers: usize,
    /// Framebuffers per connection.
    pub max_fbs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 4096x2047 XRGB8888 (the frontend's mode_config max) is 32 MiB.
        Limits {
            max_buffer_bytes: 64 << 20,
            max_total_bytes: 512 << 20,
            max_buffers: 128,
            max_fbs: 256,
        }
    }
}

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
    /// The guest's pages, mapped through gntdev.
    Guest(MappedRegion),
    /// Our pages granted to the guest (be-alloc).
    Backend(GrantedPages),
}

impl BufferMem {
    fn region(&self) -> &MappedRegion {
        match self {
            BufferMem::Guest(m) => m,
            BufferMem::Backend(g) => &g.region,
        }
    }
}

struct DisplayBuffer {
    mem: BufferMem,
    /// 0 for a buffer whose geometry arrives with FB_ATTACH (PRIME import).
    width: u32,
    height: u32,
    bpp: u32,
    data_ofs: u32,
    bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct Framebuffer {
    dbuf: u64,
    width: u32,
    height: u32,
    format: PixelFormat,
    pitch: u32,
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
}

/// The state of one connected frontend device.
pub struct Connection {
    dom: DomId,
    grants: Arc<dyn GrantMapper>,
    gntalloc: Option<Arc<dyn GrantAllocator>>,
    limits: Limits,
    dbufs: HashMap<u64, DisplayBuffer>,
    fbs: HashMap<u64, Framebuffer>,
    connectors: Vec<ConnectorState>,
    total_bytes: u64,
    log: LogLimiter,
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
            })
            .collect();
        Connection {
            dom,
            grants,
            gntalloc,
            limits,
            dbufs: HashMap::new(),
            fbs: HashMap::new(),
            connectors,
            total_bytes: 0,
            log: LogLimiter::default(),
        }
    }

    /// Number of live display buffers and framebuffers (tests, stats).
    pub fn counts(&self) -> (usize, usize) {
        (self.dbufs.len(), self.fbs.len())
    }

    /// Handle one request that arrived on connector `conn`'s ring.
    pub fn handle(&mut self, conn: u32, req: Request, out: &mut dyn Output) -> Reply {
        let result = self.dispatch(conn, req, out);
        match result {
            Ok(edid_sz) => Reply { status: 0, edid_sz },
            Err(r) => {
                if let Some(suppressed) = self.log.allow() {
                    warn!(
                        dom = self.dom.0,
                        conn,
                        errno = r.errno,
                        suppressed,
                        "refused {req:?}: {}",
                        r.why
                    );
                }
                Reply {
                    status: -r.errno,
                    edid_sz: 0,
                }
            }
        }
    }

    fn dispatch(&mut self, conn: u32, req: Request, out: &mut dyn Output) -> Result<u32, Refusal> {
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
        match req {
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
                )
                .map(|()| 0),
            Request::DbufDestroy { dbuf_cookie } => self.dbuf_destroy(dbuf_cookie).map(|()| 0),
            Request::FbAttach {
                dbuf_cookie,
                fb_cookie,
                width,
                height,
                pixel_format,
            } => self
                .fb_attach(dbuf_cookie, fb_cookie, width, height, pixel_format)
                .map(|()| 0),
            Request::FbDetach { fb_cookie } => self.fb_detach(fb_cookie).map(|()| 0),
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
        }
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
        if bytes > self.limits.max_buffer_bytes {
            return refuse(
                libc::E2BIG,
                format!(
                    "buffer_sz {buffer_sz} over the {} limit",
                    self.limits.max_buffer_bytes
                ),
            );
        }
        if self.dbufs.len() >= self.limits.max_buffers
            || self.total_bytes + bytes > self.limits.max_total_bytes
        {
            return refuse(libc::ENOMEM, "per-guest buffer budget exhausted");
        }
        if width != 0 || height != 0 || bpp != 0 {
            if width == 0 || height == 0 || !matches!(bpp, 8 | 16 | 24 | 32) {
                return refuse(libc::EINVAL, format!("geometry {width}x{height}@{bpp}"));
            }
            let pitch = (u64::from(width) * u64::from(bpp)).div_ceil(8);
            if u64::from(data_ofs) + pitch * u64::from(height) > bytes {
                return refuse(
                    libc::EINVAL,
                    format!("{width}x{height}@{bpp} does not fit buffer_sz {buffer_sz}"),
                );
            }
        }
        let pages = pages_for(bytes) as usize;
        let mem = if flags & DBUF_FLG_REQ_ALLOC != 0 {
            if width == 0 || data_ofs != 0 {
                return refuse(
                    libc::EINVAL,
                    "backend allocation needs a geometry and data_ofs 0",
                );
            }
            let Some(gntalloc) = self.gntalloc.clone() else {
                return refuse(
                    libc::EOPNOTSUPP,
                    "backend allocation unavailable (no gntalloc)",
                );
            };
            let granted = gntalloc.alloc(self.dom, pages, true).or_else(|e| {
                refuse(
                    e.errno().unwrap_or(libc::ENOMEM),
                    format!("allocating {pages} pages: {e}"),
                )
            })?;
            pgdir::write_refs(&*self.grants, self.dom, gref_directory, &granted.refs)
                .or_else(|e| refuse(e.errno(), e.to_string()))?;
            BufferMem::Backend(granted)
        } else {
            let refs = pgdir::read_refs(&*self.grants, self.dom, gref_directory, pages)
                .or_else(|e| refuse(e.errno(), e.to_string()))?;
            let mem = self
                .grants
                .map(self.dom, &refs, false)
                .or_else(|e| refuse(libc::EINVAL, format!("mapping {pages} buffer pages: {e}")))?;
            BufferMem::Guest(mem)
        };
        debug!(
            dom = self.dom.0,
            "dbuf {cookie:#x}: {width}x{height}@{bpp}, {buffer_sz} bytes, {pages} pages"
        );
        self.total_bytes += bytes;
        self.dbufs.insert(
            cookie,
            DisplayBuffer {
                mem,
                width,
                height,
                bpp,
                data_ofs,
                bytes,
            },
        );
        Ok(())
    }

    fn dbuf_destroy(&mut self, cookie: u64) -> Result<(), Refusal> {
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
            debug!(
                dom = self.dom.0,
                "fb {fb:#x} detached implicitly with its buffer"
            );
            self.forget_fb(fb);
        }
        self.total_bytes -= buf.bytes;
        // Dropping `buf` unmaps the guest's pages before we answer.
        drop(buf);
        Ok(())
    }

    fn fb_attach(
        &mut self,
        dbuf: u64,
        cookie: u64,
        width: u32,
        height: u32,
        fourcc: u32,
    ) -> Result<(), Refusal> {
        if cookie == 0 {
            return refuse(libc::EINVAL, "framebuffer cookie 0");
        }
        if self.fbs.contains_key(&cookie) {
            return refuse(libc::EEXIST, format!("framebuffer {cookie:#x} exists"));
        }
        if self.fbs.len() >= self.limits.max_fbs {
            return refuse(libc::ENOMEM, "per-guest framebuffer budget exhausted");
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
        if need > buf.mem.region().len() as u64 {
            return refuse(
                libc::EINVAL,
                format!(
                    "fb needs {need} bytes, buffer maps {}",
                    buf.mem.region().len()
                ),
            );
        }
        self.fbs.insert(
            cookie,
            Framebuffer {
                dbuf,
                width,
                height,
                format,
                pitch,
            },
        );
        Ok(())
    }

    fn forget_fb(&mut self, cookie: u64) {
        self.fbs.remove(&cookie);
        for c in &mut self.connectors {
            if c.shown.is_some_and(|s| s.fb == cookie) {
                c.shown = None;
            }
        }
    }

    fn fb_detach(&mut self, cookie: u64) -> Result<(), Refusal> {
        if !self.fbs.contains_key(&cookie) {
            return refuse(libc::ENOENT, format!("no framebuffer {cookie:#x}"));
        }
        self.forget_fb(cookie);
        Ok(())
    }

    /// The frame to show for `shown`, clipped to the connector.
    fn frame(&self, conn: usize, shown: Shown) -> Result<Frame<'_>, Refusal> {
        let Some(fb) = self.fbs.get(&shown.fb) else {
            return refuse(libc::ENOENT, format!("no framebuffer {:#x}", shown.fb));
        };
        let buf = &self.dbufs[&fb.dbuf];
        let cfg = &self.connectors[conn].cfg;
        let bytes_pp = fb.format.bpp() / 8;
        let offset = u64::from(buf.data_ofs)
            + u64::from(shown.y) * u64::from(fb.pitch)
            + u64::from(shown.x) * u64::from(bytes_pp);
        Ok(Frame {
            mem: buf.mem.region(),
            offset: offset as usize,
            width: shown.width.min(cfg.width),
            height: shown.height.min(cfg.height),
            pitch: fb.pitch,
            format: fb.format,
            fb_cookie: shown.fb,
        })
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
        let frame = self.frame(conn, shown)?;
        out.set_config(conn_id, Some(&frame))
            .or_else(|e| refuse(e.errno(), e.to_string()))?;
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
        let frame = self.frame(conn, shown)?;
        out.page_flip(conn_id, &frame)
            .or_else(|e| refuse(e.errno(), e.to_string()))?;
        self.connectors[conn].shown = Some(shown);
        Ok(())
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
        if (buffer_sz as usize) < edid.len() || buffer_sz > EDID_MAX_SIZE {
            return refuse(libc::EINVAL, format!("EDID buffer_sz {buffer_sz}"));
        }
        let pages = pages_for(u64::from(buffer_sz)) as usize;
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
            info!(
                dom = self.dom.0,
                "closing with {dbufs} display buffers and {fbs} framebuffers live"
            );
        }
        self.fbs.clear();
        self.dbufs.clear();
        self.total_bytes = 0;
    }
}

const _: () = assert!(PAGE_SIZE == 4096);
