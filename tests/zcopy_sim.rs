//! Zero-copy on the simulated Xen: the real backend and event loop with a simulated
//! gntdev dma-buf ([`SimDmaBuf`]) and a test output that "imports" dma-bufs (it holds a
//! reference as a KMS GEM handle would and scans imported framebuffers out directly).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use displback::config::ZeroCopy;
use displback::displif::connection::{Connection, ConnectorCfg, Limits};
use displback::displif::format::PixelFormat;
use displback::displif::request::Request;
use displback::displif::wire;
use displback::output::headless::{Headless, HeadlessView};
use displback::output::{
    ConnectorId, FbLayout, FlipDone, FrameSource, ImportId, ImportedFb, Output, OutputError,
    PixelSource,
};
use displback::sim::frontend::FrontendSim;
use displback::sim::SimXen;
use displback::xen::platform::GrantMapper;
use displback::xen::{DomId, GrantRef};
use displback::zcopy::sim::{SimDumb, SimEvent, SimHolder, SimMode};
use displback::zcopy::{Arch, Capabilities, DmaBufFd, DumbBuffer, SimDmaBuf, ZeroCopyGate};

const W: u32 = 320;
const H: u32 = 240;
const PERIOD: Duration = Duration::from_nanos(16_666_667);

/// What the test output did.
#[derive(Default)]
struct Stats {
    /// Frames shown by scanning out an imported framebuffer.
    direct: AtomicU64,
    /// Frames handed to the inner headless output (copied).
    copied: AtomicU64,
    /// Take an extra "compositor" reference on the next import, kept in `held`.
    hold_next: AtomicBool,
    held: Mutex<Vec<SimHolder>>,
    /// Refuse to scan out the framebuffers of the n-th import (1-based; 0: none), as
    /// a driver does that takes the PRIME import and AddFB2 but fails the commit.
    refuse_import: AtomicU64,
    /// Frames refused that way.
    refused: AtomicU64,
    imports: AtomicU64,
    /// Each import's pixel source (`Output::set_import_pixels`), as given.
    pixels: Mutex<Vec<(ImportId, PixelSource)>>,
}

/// Headless for mapped frames; imported ones are "scanned out" with no copy and
/// complete on a 60 Hz grid.
struct ImportingOutput {
    inner: Headless,
    sim: SimDmaBuf,
    stats: Arc<Stats>,
    next: u64,
    imports: HashMap<ImportId, Option<SimHolder>>,
    fbs: HashMap<ImportedFb, ImportId>,
    /// Imports whose framebuffers the "display" refuses.
    refused: std::collections::HashSet<ImportId>,
    pending: Vec<(FlipDone, Instant)>,
}

impl ImportingOutput {
    fn new(sim: &SimDmaBuf) -> (Self, HeadlessView, Arc<Stats>) {
        let inner = Headless::new();
        let view = inner.snapshot_handle();
        let stats = Arc::new(Stats::default());
        let out = ImportingOutput {
            inner,
            sim: sim.clone(),
            stats: stats.clone(),
            next: 0,
            imports: HashMap::new(),
            fbs: HashMap::new(),
            refused: Default::default(),
            pending: Vec::new(),
        };
        (out, view, stats)
    }

    /// An imported frame the "display" refuses (TEST_ONLY fails): nothing is shown.
    fn refuse(&self, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        if let FrameSource::Imported(f) = frame {
            if self
                .fbs
                .get(&f.fb)
                .is_some_and(|i| self.refused.contains(i))
            {
                self.stats.refused.fetch_add(1, Ordering::SeqCst);
                let e = std::io::Error::from_raw_os_error(libc::EINVAL);
                return Err(OutputError::ImportRefused(e));
            }
        }
        Ok(())
    }

    fn direct(&mut self, frame: &FrameSource<'_>) -> bool {
        match frame {
            FrameSource::Imported(f) => {
                assert!(self.fbs.contains_key(&f.fb), "unknown imported fb");
                self.stats.direct.fetch_add(1, Ordering::SeqCst);
                true
            }
            FrameSource::Mapped(_) => {
                self.stats.copied.fetch_add(1, Ordering::SeqCst);
                false
            }
        }
    }
}

impl Output for ImportingOutput {
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
        self.pending.retain(|(d, _)| d.conn != conn);
        self.inner.remove_connector(conn)
    }
    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        if let Some(f) = frame {
            self.refuse(f)?;
        }
        match frame {
            Some(f) if self.direct(f) => Ok(()),
            _ => self.inner.set_config(conn, frame),
        }
    }
    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        self.refuse(frame)?;
        if self.direct(frame) {
            let done = FlipDone {
                conn,
                fb_cookie: frame.fb_cookie(),
            };
            self.pending.push((done, Instant::now() + PERIOD));
            return Ok(());
        }
        self.inner.page_flip(conn, frame)
    }
    fn flip_busy(&self, conn: ConnectorId) -> bool {
        self.pending.iter().any(|(d, _)| d.conn == conn) || self.inner.flip_busy(conn)
    }
    fn next_deadline(&self) -> Option<Instant> {
        let mine = self.pending.iter().map(|(_, t)| *t).min();
        match (mine, self.inner.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        self.inner.dispatch(now, done);
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(_, t)| *t <= now);
        self.pending = later;
        done.extend(due.into_iter().map(|(d, _)| d));
    }
    fn import_dmabuf(&mut self, dmabuf: &DmaBufFd) -> Result<ImportId, OutputError> {
        let holder = self
            .sim
            .hold(dmabuf, "kms")
            .ok_or(OutputError::Unsupported)?;
        if self.stats.hold_next.swap(false, Ordering::SeqCst) {
            let extra = self.sim.hold(dmabuf, "compositor").unwrap();
            self.stats.held.lock().unwrap().push(extra);
        }
        self.next += 1;
        let id = ImportId(self.next);
        self.imports.insert(id, Some(holder));
        let n = self.stats.imports.fetch_add(1, Ordering::SeqCst) + 1;
        if self.stats.refuse_import.load(Ordering::SeqCst) == n {
            self.refused.insert(id);
        }
        Ok(id)
    }
    fn create_dumb(
        &mut self,
        width: u32,
        height: u32,
        bpp: u32,
    ) -> Result<(ImportId, Box<dyn DumbBuffer>), OutputError> {
        let pitch = (width * bpp).div_ceil(8);
        let size = (pitch * height).next_multiple_of(4096) as usize;
        self.next += 1;
        let id = ImportId(self.next);
        self.imports.insert(id, None);
        Ok((id, Box::new(SimDumb::new(&self.sim, size, pitch, "dumb"))))
    }
    fn add_imported_fb(
        &mut self,
        import: ImportId,
        layout: &FbLayout,
    ) -> Result<ImportedFb, OutputError> {
        assert!(self.imports.contains_key(&import));
        assert!(layout.pitch >= layout.width * layout.format.bpp() / 8);
        self.next += 1;
        let fb = ImportedFb(self.next);
        self.fbs.insert(fb, import);
        Ok(fb)
    }
    fn remove_imported_fb(&mut self, fb: ImportedFb) {
        self.fbs.remove(&fb);
    }
    fn set_import_pixels(&mut self, import: ImportId, pixels: PixelSource) {
        assert!(
            self.imports.contains_key(&import),
            "pixels of an unknown import"
        );
        self.stats.pixels.lock().unwrap().push((import, pixels));
    }
    fn release_import(&mut self, import: ImportId) {
        self.stats
            .pixels
            .lock()
            .unwrap()
            .retain(|(i, _)| *i != import);
        self.fbs.retain(|_, i| *i != import);
        self.refused.remove(&import);
        if self.imports.remove(&import).is_some() {
            self.sim.record("output released the import");
        }
    }
}

fn gate(sim: &SimDmaBuf, guest_type: Option<&str>) -> ZeroCopyGate {
    let caps = Capabilities::probe(sim, guest_type, Arch::Other);
    ZeroCopyGate::new(ZeroCopy::Auto, Some(Arc::new(sim.clone())), &caps).unwrap()
}

fn zero_copy_rig(sim: &SimDmaBuf) -> (Rig, Arc<Stats>) {
    let (out, view, stats) = ImportingOutput::new(sim);
    let rig = Rig::with_output(Box::new(out), view, gate(sim, Some("PVH")));
    (rig, stats)
}

#[test]
fn guest_buffers_are_exported_and_flipped_without_a_copy() {
    let sim = SimDmaBuf::default();
    let (mut rig, stats) = zero_copy_rig(&sim);
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
    assert_eq!(sim.export_calls(), 2);
    assert_eq!(sim.live_exports(), 2);
    // Exported, not mapped: the backend holds no mapping of the guest's pages.
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
    fe.set_config(0, bufs[0].1, W, H, 32).unwrap();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 20);
    assert_eq!(stats.direct.load(Ordering::SeqCst), 21);
    assert_eq!(stats.copied.load(Ordering::SeqCst), 0, "a frame was copied");
    fe.set_config(0, 0, 0, 0, 0).unwrap();
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        let outcome = fe.destroy_dumb(buf).unwrap();
        assert_eq!(outcome.status, 0);
        assert!(outcome.end_access_ok);
    }
    assert_eq!(sim.live_exports(), 0, "an export outlived DBUF_DESTROY");
    assert_eq!(sim.open_fds(), 0);
    // Order per buffer: the output let go, then our fd closed, then the release.
    let ev = sim.events();
    let released_import = ev
        .iter()
        .position(|e| matches!(e, SimEvent::Note(n) if n == "output released the import"))
        .unwrap();
    let closed = ev
        .iter()
        .position(|e| matches!(e, SimEvent::FdClosed { .. }))
        .unwrap();
    let gone = ev
        .iter()
        .position(|e| matches!(e, SimEvent::Released { .. }))
        .unwrap();
    assert!(released_import < closed && closed <= gone, "{ev:#?}");
}

/// Each imported guest buffer comes with a way to read its pixels (the guest's grants,
/// mapped on demand: gntdev's dma-bufs cannot be mmapped), for an output that must copy
/// a picture it shows; the mapping is the guest's own pages and goes with the region.
#[test]
fn imports_come_with_the_guests_pages_for_a_copy() {
    let sim = SimDmaBuf::default();
    let (mut rig, stats) = zero_copy_rig(&sim);
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
    for (i, (buf, _)) in bufs.iter().enumerate() {
        draw(buf, PixelFormat::Xrgb8888, 7 + i as u32, 0);
    }
    let pixels = stats.pixels.lock().unwrap();
    assert_eq!(pixels.len(), 2, "one pixel source per import");
    for ((_, source), (buf, _)) in pixels.iter().zip(&bufs) {
        let mem = source().unwrap();
        let len = buf.region().len();
        assert!(mem.len() >= len);
        let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
        mem.read(0, &mut got).unwrap();
        buf.region().read(0, &mut want).unwrap();
        assert!(got == want, "the source's pages are not the guest's buffer");
        assert!(rig.sim.total_mapped_pages() > baseline, "mapped while read");
        drop(mem);
        assert_eq!(rig.sim.total_mapped_pages(), baseline, "unmapped after");
    }
    drop(pixels);
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        assert_eq!(fe.destroy_dumb(buf).unwrap().status, 0);
    }
    assert!(
        stats.pixels.lock().unwrap().is_empty(),
        "released with the imports"
    );
}

#[test]
fn a_buffer_the_display_refuses_is_copied_and_the_others_stay_zero_copy() {
    let sim = SimDmaBuf::default();
    let (mut rig, stats) = zero_copy_rig(&sim);
    // The second buffer's import: the "driver" takes it and its framebuffer, but
    // refuses every commit of it.
    stats.refuse_import.store(2, Ordering::SeqCst);
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
    assert_eq!(sim.live_exports(), 2);
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
    // SET_CONFIG with the refused buffer succeeds (copied), zero-copy stays on.
    draw(&bufs[1].0, PixelFormat::Xrgb8888, 0, 0);
    fe.set_config(0, bufs[1].1, W, H, 32).unwrap();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 0, 0, W, H),
        W,
        H,
    );
    // Odd frames go to the refused buffer: every flip is answered (status 0 and its
    // event, checked by flip_frames), the guest drawing into the same pages each time.
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 21);
    assert_eq!(
        stats.refused.load(Ordering::SeqCst),
        1,
        "refused more than once: the buffer did not stay on the copy path"
    );
    assert_eq!(
        stats.copied.load(Ordering::SeqCst),
        12,
        "refused buffer's frames"
    );
    assert_eq!(
        stats.direct.load(Ordering::SeqCst),
        10,
        "the other buffer's"
    );
    // The last frame (21) went through the copy path from the guest's pages.
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 21, 0, W, H),
        W,
        H,
    );
    // The refused buffer's export is gone and its pages are mapped instead; the other
    // buffer is still exported, not mapped.
    assert_eq!(sim.live_exports(), 1);
    let pages = (W * H * 4).div_ceil(4096) as usize;
    assert_eq!(rig.sim.total_mapped_pages(), baseline + pages);
    fe.set_config(0, 0, 0, 0, 0).unwrap();
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        let outcome = fe.destroy_dumb(buf).unwrap();
        assert_eq!(outcome.status, 0);
        assert!(outcome.end_access_ok);
    }
    assert_eq!(sim.live_exports(), 0);
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
}

#[test]
fn pv_einval_falls_back_to_the_copy_path_with_the_right_picture() {
    let sim = SimDmaBuf::new(SimMode::PteMod);
    let headless = Headless::new();
    let view = headless.snapshot_handle();
    // Guest type unknown: EINVAL before any export worked reads as a PV backend.
    let mut rig = Rig::with_output(Box::new(headless), view, gate(&sim, None));
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Rgb565);
    // The first export's EINVAL switched exports off for every later buffer.
    assert_eq!(sim.export_calls(), 1);
    draw(&bufs[0].0, PixelFormat::Rgb565, 0, 0);
    fe.set_config(0, bufs[0].1, W, H, 16).unwrap();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Rgb565, 3);
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Rgb565, 3, 0, W, H),
        W,
        H,
    );
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        assert_eq!(fe.destroy_dumb(buf).unwrap().status, 0);
    }
}

#[test]
fn an_output_that_cannot_import_gets_a_copied_buffer() {
    // Exports work, but headless cannot import: the export is dropped, the buffer mapped.
    let sim = SimDmaBuf::default();
    let headless = Headless::new();
    let view = headless.snapshot_handle();
    let mut rig = Rig::with_output(Box::new(headless), view, gate(&sim, Some("HVM")));
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
    assert_eq!(sim.export_calls(), 2);
    assert_eq!(sim.live_exports(), 0);
    draw(&bufs[1].0, PixelFormat::Xrgb8888, 7, 0);
    fe.set_config(0, bufs[1].1, W, H, 32).unwrap();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 7, 0, W, H),
        W,
        H,
    );
}

#[test]
fn be_alloc_falls_back_to_gntalloc_when_imports_are_unavailable() {
    let sim = SimDmaBuf::new(SimMode::Missing(libc::ENOTTY));
    let (out, view, stats) = ImportingOutput::new(&sim);
    let mut rig = Rig::with_output(Box::new(out), view, gate(&sim, Some("PVH")));
    let mut fe = rig.guest_with(1, true, &[("Virtual-1", W, H)]);
    let buf = fe.create_dumb_be_alloc(W, H, 32).unwrap();
    assert!(buf.is_be_alloc());
    let fb = fe
        .attach_fb(&buf, W, H, PixelFormat::Xrgb8888.fourcc())
        .unwrap();
    draw(&buf, PixelFormat::Xrgb8888, 2, 0);
    fe.set_config(0, fb, W, H, 32).unwrap();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 2, 0, W, H),
        W,
        H,
    );
    assert_eq!(stats.copied.load(Ordering::SeqCst), 1);
    assert_eq!(sim.live_imports(), 0);
    fe.detach_fb(fb).unwrap();
    assert_eq!(fe.destroy_dumb(buf).unwrap().status, 0);
}

/// A guest directory page for a be-alloc buffer of `pages` pages (one directory page).
fn be_alloc_directory(xen: &SimXen, guest: DomId) -> (displback::sim::SimPages, u32) {
    let mem = xen.guest_mem(guest);
    let dir = mem.alloc(1).unwrap();
    let refs = mem.grant(&dir, BACKEND, false);
    (dir, refs[0].0)
}

#[test]
fn be_alloc_through_the_gate_grants_the_outputs_dumb_buffer() {
    let xen = SimXen::new();
    let guest = DomId(1);
    let sim = SimDmaBuf::default();
    let (mut out, _view, stats) = ImportingOutput::new(&sim);
    let cfg = ConnectorCfg {
        unique_id: "Virtual-1".into(),
        width: 64,
        height: 64,
    };
    let id = ConnectorId {
        dom: guest,
        dev: 0,
        idx: 0,
    };
    out.add_connector(id, "Virtual-1", 64, 64).unwrap();
    let mapper = xen.grant_mapper(BACKEND);
    let mut conn = Connection::new(
        guest,
        0,
        vec![cfg],
        mapper.clone(),
        Some(xen.gntalloc(BACKEND)),
        Limits::default(),
    )
    .with_be_alloc(true)
    .with_zero_copy(Arc::new(Mutex::new(gate(&sim, Some("PVH")))));
    let (dir, gref) = be_alloc_directory(&xen, guest);
    let size = 64 * 64 * 4;
    let mut req = |r: Request, out: &mut ImportingOutput| conn.handle(0, r, out).status;
    let create = Request::DbufCreate {
        dbuf_cookie: 1,
        width: 64,
        height: 64,
        bpp: 32,
        buffer_sz: size,
        flags: wire::DBUF_FLG_REQ_ALLOC,
        gref_directory: gref,
        data_ofs: 0,
    };
    assert_eq!(req(create, &mut out), 0);
    assert_eq!(sim.live_imports(), 1);
    // The directory holds the refs IMP_TO_REFS returned (the sim numbers them from 1000).
    let mut first = [0u8; 4];
    dir.region().read(wire::pgdir::GREFS, &mut first).unwrap();
    assert_eq!(u32::from_le_bytes(first), 1000);
    // Nothing of ours was mapped or allocated through gntalloc for it.
    assert_eq!(mapper.mapped_pages(), 0);
    let attach = Request::FbAttach {
        dbuf_cookie: 1,
        fb_cookie: 2,
        width: 64,
        height: 64,
        pixel_format: PixelFormat::Xrgb8888.fourcc(),
    };
    assert_eq!(req(attach, &mut out), 0);
    let config = Request::SetConfig {
        fb_cookie: 2,
        x: 0,
        y: 0,
        width: 64,
        height: 64,
        bpp: 32,
    };
    assert_eq!(req(config, &mut out), 0);
    assert_eq!(req(Request::PgFlip { fb_cookie: 2 }, &mut out), 0);
    assert_eq!(stats.direct.load(Ordering::SeqCst), 2);
    assert_eq!(stats.copied.load(Ordering::SeqCst), 0);
    assert_eq!(req(Request::DbufDestroy { dbuf_cookie: 1 }, &mut out), 0);
    assert_eq!(sim.live_imports(), 0);
    let ev = sim.events();
    let released = ev
        .iter()
        .position(|e| matches!(e, SimEvent::ImportReleased { .. }))
        .unwrap();
    let freed = ev
        .iter()
        .position(|e| matches!(e, SimEvent::Note(n) if n == "dumb: freed"))
        .unwrap();
    assert!(released < freed, "{ev:#?}");
}

/// Flip `guest` at 60 Hz until `stop`; returns (flips, the longest flip request to
/// event time).
fn flip_until(
    mut fe: FrontendSim,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(FrontendSim, u32, Duration)> {
    thread::spawn(move || {
        let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
        fe.set_config(0, bufs[0].1, W, H, 32).unwrap();
        let (mut n, mut worst) = (0u32, Duration::ZERO);
        while !stop.load(Ordering::SeqCst) {
            let (_, fb) = &bufs[(n % 2) as usize];
            let t = Instant::now();
            fe.page_flip(0, *fb).unwrap();
            fe.wait_flip_event(0, *fb, FLIP_WAIT).unwrap();
            worst = worst.max(t.elapsed());
            n += 1;
        }
        (fe, n, worst)
    })
}

/// Set up guest 1 with one zero-copy buffer held by a "compositor", start guest 2
/// flipping, destroy guest 1's buffer; `hold` is how long the compositor keeps it.
fn destroy_while_held(hold: Duration) -> (i32, Duration, Duration, u32, Duration) {
    let sim = SimDmaBuf::default();
    let (mut rig, stats) = zero_copy_rig(&sim);
    let mut fe1 = rig.guest(1, &[("Virtual-1", W, H)]);
    let fe2 = rig.guest(2, &[("Virtual-2", W, H)]);
    stats.hold_next.store(true, Ordering::SeqCst);
    let held = buffers(&mut fe1, 1, W, H, PixelFormat::Xrgb8888).remove(0);
    assert_eq!(stats.held.lock().unwrap().len(), 1);
    fe1.set_config(0, held.1, W, H, 32).unwrap();
    fe1.set_config(0, 0, 0, 0, 0).unwrap();
    fe1.detach_fb(held.1).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flipper = flip_until(fe2, stop.clone());
    thread::sleep(Duration::from_millis(100));
    let dropper = {
        let stats = stats.clone();
        thread::spawn(move || {
            thread::sleep(hold);
            // Taken before letting go: a time taken after it may come later than the
            // answer it allowed (this thread can be descheduled in between).
            let letting_go = Instant::now();
            stats.held.lock().unwrap().clear();
            letting_go
        })
    };
    let start = Instant::now();
    let outcome = fe1.destroy_dumb(held.0).unwrap();
    let answered = Instant::now();
    let took = answered - start;
    let dropped_at = dropper.join().unwrap();
    // Let guest 2 flip a little longer after the answer.
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let (_fe2, flips, worst) = flipper.join().unwrap();
    let released_before_answer = answered >= dropped_at;
    if outcome.status == 0 {
        assert!(
            released_before_answer,
            "answered 0 before the holder let go"
        );
        // Only guest 2's two buffers are still exported.
        assert_eq!(sim.live_exports(), 2);
        assert!(outcome.end_access_ok);
    }
    (outcome.status, took, hold, flips, worst)
}

#[test]
fn destroy_waits_for_the_release_while_other_guests_keep_flipping() {
    let (status, took, hold, flips, worst) = destroy_while_held(Duration::from_millis(600));
    assert_eq!(status, 0);
    assert!(
        took >= hold - Duration::from_millis(150),
        "answered after {took:?}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );
    // ~800 ms of flipping at 60 Hz: no flip waited for the other guest's release.
    assert!(flips >= 30, "guest 2 flipped only {flips} times");
    // A flip that waited for guest 1's release would take the whole 600 ms hold; the
    // margin below it is for a loaded test machine, not a speed claim.
    assert!(worst < Duration::from_millis(400), "a flip took {worst:?}");
}

#[test]
fn destroy_times_out_honestly_when_the_buffer_stays_held() {
    let (status, took, _hold, flips, worst) = destroy_while_held(Duration::from_millis(2600));
    assert_eq!(status, -libc::ETIMEDOUT);
    assert!(
        took >= Duration::from_millis(1900),
        "answered after {took:?}"
    );
    assert!(
        took < Duration::from_millis(3000),
        "answered after {took:?}"
    );
    assert!(flips >= 100, "guest 2 flipped only {flips} times");
    // A flip that waited for the held buffer would take the ~2 s release timeout.
    assert!(worst < Duration::from_millis(1000), "a flip took {worst:?}");
}

/// The udmabuf exporter on this host's /dev/udmabuf: the dma-buf is made of the very
/// pages the guest writes (before and after the export), the grants stay pinned while
/// the fd is open, and a bad ref is EINVAL like EXP_FROM_REFS.
#[test]
#[ignore = "needs /dev/udmabuf (CONFIG_UDMABUF; `modprobe udmabuf`): run with --ignored where it exists"]
fn udmabuf_export_is_made_of_the_guests_own_pages() {
    use displback::zcopy::{DmaBufOps, ExportFlags};
    let xen = SimXen::new();
    let backend = DomId(0);
    let guest = xen.guest_mem(DomId(1));
    let pages = guest.alloc(3).unwrap();
    let refs = guest.grant(&pages, backend, false);
    let ex = xen
        .udmabuf_exporter(backend)
        .expect("/dev/udmabuf must exist for this test");
    pages.region().write(0, b"before").unwrap();
    let baseline = xen.total_mapped_pages();
    let fd = ex
        .export_from_refs(DomId(1), &refs, ExportFlags::None)
        .unwrap();
    assert_eq!(ex.live_exports(), 1);
    assert_eq!(
        xen.total_mapped_pages(),
        baseline + 3,
        "export pins the grants"
    );
    let view = displback::xen::mem::shared(fd.as_fd().unwrap(), 3 * 4096).unwrap();
    let mut got = [0u8; 6];
    view.read(0, &mut got).unwrap();
    assert_eq!(&got, b"before");
    // The guest draws again into the same pages: the dma-buf shows it.
    pages.region().write(2 * 4096 + 100, b"after!").unwrap();
    view.read(2 * 4096 + 100, &mut got).unwrap();
    assert_eq!(&got, b"after!");
    drop(view);
    drop(fd);
    assert_eq!(ex.live_exports(), 0);
    assert_eq!(
        xen.total_mapped_pages(),
        baseline,
        "closing unpins the grants"
    );
    let e = ex
        .export_from_refs(DomId(1), &[GrantRef(4242)], ExportFlags::None)
        .unwrap_err();
    assert_eq!(e.raw_errno(), libc::EINVAL);
}
