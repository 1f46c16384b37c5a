//! A backend on the simulated Xen, plus helpers to bring up simulated guests.
#![allow(dead_code)]

use std::thread::JoinHandle;
use std::time::Duration;

use displback::backend::server::{InputHandle, Server, ServerConfig, StopHandle};
use displback::displif::budget::Limits;
use displback::displif::format::PixelFormat;
use displback::output::convert::convert_row;
use displback::output::headless::{Headless, HeadlessView, Image};
use displback::output::ConnectorId;
use displback::sim::frontend::{DumbBuf, FrontendSim};
use displback::sim::pattern;
use displback::sim::toolstack::Toolstack;
use displback::sim::xenstored::SimXenstored;
use displback::sim::SimXen;
use displback::xen::xenstore::XsClient;
use displback::xen::DomId;
use displback::zcopy::ZeroCopyGate;

pub const BACKEND: DomId = DomId(0);
pub const WAIT: Duration = Duration::from_secs(10);
pub const FLIP_WAIT: Duration = Duration::from_millis(3100);

/// The backend (headless output) running in its own thread on a simulated Xen.
pub struct Rig {
    pub sim: SimXen,
    pub xenstored: SimXenstored,
    pub view: HeadlessView,
    pub toolstack: Toolstack,
    backend: Option<(StopHandle, JoinHandle<()>)>,
    /// Hands input to the running backend's vkbd devices.
    pub input: Option<InputHandle>,
    /// The configuration every backend of this rig starts with.
    pub cfg: ServerConfig,
}

impl Rig {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A rig whose backend (headless output) enforces `limits` per guest.
    pub fn with_limits(limits: Limits) -> Self {
        let headless = Headless::new();
        let view = headless.snapshot_handle();
        let cfg = ServerConfig {
            limits,
            ..ServerConfig::default()
        };
        Self::with_config(Box::new(headless), view, ZeroCopyGate::off(), cfg)
    }

    /// A rig whose backend uses `output` (`view` shows what its headless part shows)
    /// and decides on zero-copy with `gate`.
    pub fn with_output(
        output: Box<dyn displback::output::Output + Send>,
        view: HeadlessView,
        gate: ZeroCopyGate,
    ) -> Self {
        Self::with_config(output, view, gate, ServerConfig::default())
    }

    fn with_config(
        output: Box<dyn displback::output::Output + Send>,
        view: HeadlessView,
        gate: ZeroCopyGate,
        cfg: ServerConfig,
    ) -> Self {
        let mut rig = Self::unstarted(cfg);
        rig.view = view;
        rig.start_backend_with(output, gate);
        rig
    }

    /// A rig whose backend (configured with `cfg`) is not running yet: devices can be
    /// made before [`Rig::start`] or [`Rig::start_backend`] starts it.
    pub fn unstarted(cfg: ServerConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let sim = SimXen::new();
        let xenstored = SimXenstored::new();
        let toolstack =
            Toolstack::new(XsClient::from_stream(xenstored.connect(0).unwrap()).unwrap());
        Rig {
            sim,
            xenstored,
            view: HeadlessView::default(),
            toolstack,
            backend: None,
            input: None,
            cfg,
        }
    }

    /// Start a backend with a fresh headless output (`view` follows it).
    pub fn start(&mut self) {
        let headless = Headless::new();
        self.view = headless.snapshot_handle();
        self.start_backend(Box::new(headless));
    }

    /// Add a vdispl device for guest `dom` like libxl, from another thread (libxl waits
    /// up to 10 s for the backend's InitWait); the handle says whether it got it.
    pub fn add_vdispl_in_background(
        &self,
        dom: u16,
        connectors: &[(&str, u32, u32)],
    ) -> JoinHandle<Result<(), displback::sim::toolstack::ToolstackError>> {
        let conns: Vec<(String, u32, u32)> = connectors
            .iter()
            .map(|(id, w, h)| (id.to_string(), *w, *h))
            .collect();
        let xs = XsClient::from_stream(self.xenstored.connect(0).unwrap()).unwrap();
        std::thread::spawn(move || {
            Toolstack::new(xs).add_vdispl(BACKEND, DomId(dom), 0, false, &conns)
        })
    }

    /// A frontend for guest `dom`'s device 0 (made already), connected.
    pub fn connect_frontend(&self, dom: u16) -> FrontendSim {
        let xs = XsClient::from_stream(self.xenstored.connect(dom).unwrap()).unwrap();
        let mut fe = FrontendSim::new(&self.sim, xs, DomId(dom), 0).unwrap();
        fe.wait_connected(WAIT).unwrap();
        fe
    }

    /// Start a backend process (there must be none running).
    pub fn start_backend(&mut self, output: Box<dyn displback::output::Output + Send>) {
        self.start_backend_with(output, ZeroCopyGate::off());
    }

    fn start_backend_with(
        &mut self,
        output: Box<dyn displback::output::Output + Send>,
        gate: ZeroCopyGate,
    ) {
        assert!(self.backend.is_none());
        let plat = self.sim.platform(&self.xenstored, BACKEND).unwrap();
        let mut server = Server::new(plat, output, self.cfg.clone())
            .unwrap()
            .with_zero_copy(gate);
        let stop = server.stop_handle();
        self.input = Some(server.input_handle());
        let thread = std::thread::spawn(move || server.run().expect("backend failed"));
        self.backend = Some((stop, thread));
    }

    /// A fresh headless output for a restarted backend; `view` follows it.
    pub fn restart_backend_after_crash(&mut self) {
        let (stop, thread) = self.backend.take().unwrap();
        stop.crash();
        thread.join().unwrap();
        let headless = Headless::new();
        self.view = headless.snapshot_handle();
        self.start_backend(Box::new(headless));
    }

    pub fn stop_backend(&mut self) {
        if let Some((stop, thread)) = self.backend.take() {
            stop.stop();
            thread.join().unwrap();
        }
    }

    /// Create a guest with one vdispl device and connect its frontend.
    pub fn guest(&mut self, dom: u16, connectors: &[(&str, u32, u32)]) -> FrontendSim {
        self.guest_with(dom, false, connectors)
    }

    pub fn guest_with(
        &mut self,
        dom: u16,
        be_alloc: bool,
        connectors: &[(&str, u32, u32)],
    ) -> FrontendSim {
        let conns: Vec<(String, u32, u32)> = connectors
            .iter()
            .map(|(id, w, h)| (id.to_string(), *w, *h))
            .collect();
        self.toolstack
            .add_vdispl(BACKEND, DomId(dom), 0, be_alloc, &conns)
            .unwrap();
        let xs = XsClient::from_stream(self.xenstored.connect(dom).unwrap()).unwrap();
        let mut fe = FrontendSim::new(&self.sim, xs, DomId(dom), 0).unwrap();
        fe.wait_connected(WAIT).unwrap();
        fe
    }

    /// Read a XenStore node as the toolstack.
    pub fn read(&mut self, path: &str) -> Option<String> {
        self.toolstack
            .xs()
            .read(displback::xen::xenstore::Tx::NONE, path)
            .unwrap()
    }

    /// Wait until `path` reads `want`.
    pub fn wait_node(&mut self, path: &str, want: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if self.read(path).as_deref() == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never became {want:?} (is {:?})",
                self.read(path)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn frame(&self, dom: u16, idx: u32) -> Image {
        self.view
            .frame(ConnectorId {
                dom: DomId(dom),
                dev: 0,
                idx,
            })
            .expect("no frame shown")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.backend.take() {
            stop.stop();
            let _ = thread.join();
        }
    }
}

/// Draw pattern `frame` of connector `conn` into `buf` in `format`.
pub fn draw(buf: &DumbBuf, format: PixelFormat, frame: u32, conn: u32) {
    displback::demo::draw(buf, format, frame, conn).unwrap();
}

/// What the output must show for a buffer drawn with `draw`: the guest's bytes converted
/// to XRGB8888 by the reference converter, as 0x00RRGGBB.
pub fn expected(format: PixelFormat, frame: u32, conn: u32, width: u32, height: u32) -> Vec<u32> {
    let mut src = vec![0u8; format.min_pitch(width).unwrap() as usize];
    let mut dst = vec![0u8; width as usize * 4];
    let mut out = Vec::with_capacity((width * height) as usize);
    for y in 0..height {
        pattern::draw_row(format, frame, conn, y, &mut src);
        convert_row(format, &src, &mut dst, width as usize);
        out.extend(
            dst.chunks_exact(4)
                .map(|p| u32::from_le_bytes([p[0], p[1], p[2], 0])),
        );
    }
    out
}

/// Assert an image equals the expected pixels, naming the first difference.
pub fn assert_image(img: &Image, want: &[u32], width: u32, height: u32) {
    assert_eq!((img.width, img.height), (width, height));
    // The X byte of an XRGB8888 source is kept as drawn: compare RGB.
    let rgb = |p: u32| p & 0x00ff_ffff;
    if let Some(i) = img
        .pixels
        .iter()
        .zip(want)
        .position(|(a, b)| rgb(*a) != rgb(*b))
    {
        panic!(
            "pixel ({}, {}) is {:#08x}, expected {:#08x}",
            i as u32 % width,
            i as u32 / width,
            img.pixels[i],
            want[i]
        );
    }
}

/// Set up `n` buffers + framebuffers on connector 0's ring at the connector's size.
pub fn buffers(
    fe: &mut FrontendSim,
    n: usize,
    w: u32,
    h: u32,
    format: PixelFormat,
) -> Vec<(DumbBuf, u64)> {
    (0..n)
        .map(|_| {
            let buf = fe.create_dumb(w, h, format.bpp()).unwrap();
            let fb = fe.attach_fb(&buf, w, h, format.fourcc()).unwrap();
            (buf, fb)
        })
        .collect()
}

/// Flip `frames` frames on connector `conn`, alternating two buffers; checks every event.
pub fn flip_frames(
    fe: &mut FrontendSim,
    conn: u32,
    bufs: &[(DumbBuf, u64)],
    format: PixelFormat,
    frames: u32,
) {
    for f in 1..=frames {
        let (buf, fb) = &bufs[(f % 2) as usize];
        draw(buf, format, f, conn);
        fe.page_flip(conn, *fb).unwrap();
        fe.wait_flip_event(conn, *fb, FLIP_WAIT).unwrap();
    }
}

/// Two XRGB8888 buffers on connector `conn` of guest `dom`, shown with SET_CONFIG and
/// flipped `frames` times; checks the final picture. Returns the buffers.
pub fn show_and_flip(
    rig: &Rig,
    fe: &mut FrontendSim,
    dom: u16,
    conn: u32,
    (w, h): (u32, u32),
    frames: u32,
) -> Vec<(DumbBuf, u64)> {
    let format = PixelFormat::Xrgb8888;
    let bufs = buffers(fe, 2, w, h, format);
    draw(&bufs[0].0, format, 0, conn);
    fe.set_config(conn, bufs[0].1, w, h, format.bpp()).unwrap();
    flip_frames(fe, conn, &bufs, format, frames);
    assert_image(
        &rig.frame(dom, conn),
        &expected(format, frames, conn, w, h),
        w,
        h,
    );
    bufs
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "displback-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
