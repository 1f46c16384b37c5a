//! Guest test client: a minimal KMS program for the VM harnesses (scripts/domu-test).
//!
//! Opens a DRM card, picks the first connected connector and a mode, creates two
//! dumb buffers, draws `displback::sim::pattern::pixel(frame, conn, x, y)` into them
//! (`--pattern-conn`, default 0: two guests can draw distinct patterns), sets the CRTC
//! and page-flips `--frames` times (and for at least `--min-secs`), measuring flip
//! latency (request to flip event). Prints machine-readable lines on stdout (all start with
//! `GUEST-CLIENT`), then holds the last frame on screen for `--hold-secs` so the
//! host can take a screendump. Works on any KMS device (bochs-drm, virtio-gpu,
//! xen-drm-front).
//!
//! Frame numbering: the buffer shown by set_crtc holds frame 0; flip k (1..=N)
//! shows frame k, so the held frame is N (printed in the HOLD line with the pattern's
//! connector number). `GUEST-CLIENT FLIPPING` is printed once the first flip is done.
//!
//! `--flood` (the aggressor of a noisy-neighbour test): draws frames 0 and 1 once, then
//! page-flips between the two buffers as fast as the kernel lets it for `--min-secs`
//! (and at least `--frames` flips). xen-drm-front allows one flip in flight per CRTC:
//! each flip's event is read as soon as it arrives and the next flip is requested at
//! once; a flip refused with EBUSY reads the pending event (if one of ours is in
//! flight) and is retried at once. Nothing sleeps and nothing is redrawn.
//!
//! Failing loudly: the exit status is non-zero, after a `GUEST-CLIENT ERROR <why>` line,
//! when a KMS request fails (set_crtc, a page flip other than a retried EBUSY), when a
//! flip event does not arrive within `--flip-timeout-ms`, or when the display driver
//! reported a failure the ioctls cannot show. xen-drm-front sends its requests to the
//! backend after the ioctl returned: a refused SET_CONFIG or PG_FLIP only shows as a
//! `*ERROR*` line in the kernel log (the pending event is still sent) and as the
//! connector going disconnected. So the client reads `/dev/kmsg` (records after its
//! start) while flipping and probes the connector at the end.
//!
//! Summary, one line of key=value words (also printed, with `ok=0`, on failure):
//! `GUEST-CLIENT RESULT ok=1 mode=flip|flood flips=N events=N ebusy=N p50_ms=.. p99_ms=..
//! max_ms=.. secs=.. rate_hz=.. held_frame=N conn=C kmsg=1 driver_error=0`
//! (`driver_error=1`: it failed because the display driver logged an error).
//! The older `GUEST-CLIENT mode=.. frames=N p50_us=..` line is kept (parsers use it).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use displback::output::kms::Card;
use drm::buffer::{Buffer, DrmFourcc};
use drm::control::{connector, crtc, Device as ControlDevice, Event, Mode, PageFlipFlags};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Xrgb8888,
    Rgb565,
}

#[derive(Parser, Debug)]
#[command(about = "KMS test client for the displback VM harnesses")]
struct Args {
    /// DRM card to use; default: the first /dev/dri/card* with a connected connector.
    #[arg(long)]
    card: Option<PathBuf>,
    /// Mode to use, WxH; default: the connector's first (preferred) mode.
    #[arg(long)]
    mode: Option<String>,
    /// Pixel format of the dumb buffers.
    #[arg(long, value_enum, default_value = "xrgb8888")]
    format: Format,
    /// Number of page flips after the initial set_crtc.
    #[arg(long, default_value_t = 300)]
    frames: u32,
    /// Seconds to keep the last frame on screen after the HOLD line.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Seconds to wait for a usable card to appear (e.g. xen-drm-front connecting).
    #[arg(long, default_value_t = 0)]
    wait_secs: u64,
    /// Keep flipping (past --frames) until this many seconds of flipping have passed.
    #[arg(long, default_value_t = 0)]
    min_secs: u64,
    /// Connector number of the test pattern (sim::pattern's `conn`).
    #[arg(long, default_value_t = 0)]
    pattern_conn: u32,
    /// Give up on a flip event after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    flip_timeout_ms: u64,
    /// Aggressor mode: flip the two buffers as fast as the kernel allows for
    /// --min-secs (no redraws, no sleeps; EBUSY waits for the pending event).
    #[arg(long)]
    flood: bool,
}

/// A connector ready to be driven: card, connector, CRTC and mode.
struct Target {
    card: Card,
    path: PathBuf,
    conn: connector::Info,
    crtc: crtc::Handle,
    mode: Mode,
}

fn parse_mode(s: &str) -> Result<(u16, u16)> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| anyhow!("mode must be WxH, got {s:?}"))?;
    Ok((w.parse()?, h.parse()?))
}

fn open_target(path: &Path, want: Option<(u16, u16)>) -> Result<Target> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let card = Card(file);
    let res = card.resource_handles().context("resource_handles")?;
    let conn = res
        .connectors()
        .iter()
        .filter_map(|&c| card.get_connector(c, true).ok())
        .find(|c| c.state() == connector::State::Connected && !c.modes().is_empty())
        .ok_or_else(|| anyhow!("{}: no connected connector with modes", path.display()))?;
    let mode = match want {
        None => conn.modes()[0],
        Some(wh) => *conn
            .modes()
            .iter()
            .find(|m| m.size() == wh)
            .ok_or_else(|| anyhow!("connector has no mode {}x{}", wh.0, wh.1))?,
    };
    // A CRTC the connector's encoders can drive: prefer the current one.
    let mut crtc = None;
    for &enc in conn.encoders() {
        let Ok(info) = card.get_encoder(enc) else {
            continue;
        };
        if let Some(c) = info.crtc() {
            crtc = Some(c);
            break;
        }
        if let Some(&c) = res.filter_crtcs(info.possible_crtcs()).first() {
            crtc = Some(c);
            break;
        }
    }
    let crtc = match crtc {
        Some(c) => c,
        None => *res.crtcs().first().ok_or_else(|| anyhow!("no CRTC"))?,
    };
    Ok(Target {
        card,
        path: path.to_owned(),
        conn,
        crtc,
        mode,
    })
}

fn find_target(args: &Args) -> Result<Target> {
    let want = args.mode.as_deref().map(parse_mode).transpose()?;
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    loop {
        let result = match &args.card {
            Some(p) => open_target(p, want),
            None => {
                let mut cards: Vec<PathBuf> = std::fs::read_dir("/dev/dri")
                    .map(|rd| {
                        rd.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| {
                                p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with("card"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                cards.sort();
                let mut last = anyhow!("no /dev/dri/card* present");
                let mut found = None;
                for p in cards {
                    match open_target(&p, want) {
                        Ok(t) => {
                            found = Some(t);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                found.ok_or(last)
            }
        };
        match result {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Draws frame `frame` of the test pattern (connector `conn`) into a mapped dumb buffer.
fn draw(map: &mut [u8], pitch: usize, w: usize, h: usize, format: Format, frame: u32, conn: u32) {
    for y in 0..h {
        let row = &mut map[y * pitch..];
        match format {
            Format::Xrgb8888 => {
                for (x, px) in row[..w * 4].chunks_exact_mut(4).enumerate() {
                    let v = displback::sim::pattern::pixel(frame, conn, x as u32, y as u32);
                    px.copy_from_slice(&v.to_le_bytes());
                }
            }
            Format::Rgb565 => {
                for (x, px) in row[..w * 2].chunks_exact_mut(2).enumerate() {
                    let v = displback::sim::pattern::pixel(frame, conn, x as u32, y as u32);
                    let (r, g, b) = ((v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff);
                    let p = ((r >> 3) << 11 | (g >> 2) << 5 | (b >> 3)) as u16;
                    px.copy_from_slice(&p.to_le_bytes());
                }
            }
        }
    }
}

/// Waits (with a timeout) for the page-flip event of `crtc`; returns how many page-flip
/// events of `crtc` were read (at least 1).
fn wait_flip(card: &Card, crtc: crtc::Handle, timeout: Duration) -> Result<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no page-flip event within {} ms", timeout.as_millis());
        }
        let mut pfd = libc::pollfd {
            fd: card.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if n == 0 {
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            bail!("DRM fd error (revents={:#x}); device gone?", pfd.revents);
        }
        let mut got = 0;
        for ev in card.receive_events().context("read DRM events")? {
            if let Event::PageFlip(pf) = ev {
                if pf.crtc == crtc {
                    got += 1;
                }
            }
        }
        if got > 0 {
            return Ok(got);
        }
    }
}

/// The kernel log from now on (`/dev/kmsg`, non-blocking): display drivers report
/// failures there that no ioctl returns (xen-drm-front: a request the backend refused).
struct KernelLog(Option<File>);

impl KernelLog {
    fn open() -> KernelLog {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok();
        if let Some(f) = &f {
            // SAFETY: lseek on a valid fd; SEEK_END on /dev/kmsg skips older records.
            unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
        }
        KernelLog(f)
    }

    fn available(&self) -> bool {
        self.0.is_some()
    }

    /// The first driver error logged since the last call (DRM's `*ERROR*` lines,
    /// xen-drm-front's frame-done timeout), if any.
    fn error(&mut self) -> Option<String> {
        let f = self.0.as_mut()?;
        let mut buf = [0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let msg = rec.split_once(';').map_or(&*rec, |(_, m)| m);
                    let msg = msg.lines().next().unwrap_or("").trim();
                    if msg.contains("*ERROR*") || msg.contains("Frame done timed-out") {
                        return Some(msg.to_owned());
                    }
                }
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// What a run measured; printed as the RESULT line (also when it failed).
#[derive(Default)]
struct Stats {
    mode: &'static str,
    flips: u32,
    events: u32,
    ebusy: u64,
    lat_us: Vec<u64>,
    secs: f64,
    held_frame: u32,
    conn: u32,
    kmsg: bool,
    /// The run failed because the display driver logged an error (kernel log).
    driver_error: bool,
    /// When flipping began.
    start: Option<Instant>,
}

impl Stats {
    fn result_line(&self, ok: bool) -> String {
        let mut lat = self.lat_us.clone();
        lat.sort_unstable();
        let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
        let rate = if self.secs > 0.0 {
            self.flips as f64 / self.secs
        } else {
            0.0
        };
        format!(
            "GUEST-CLIENT RESULT ok={} mode={} flips={} events={} ebusy={} p50_ms={} p99_ms={} \
             max_ms={} secs={:.3} rate_hz={:.1} held_frame={} conn={} kmsg={} driver_error={}",
            u8::from(ok),
            self.mode,
            self.flips,
            self.events,
            self.ebusy,
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or(0)),
            self.secs,
            rate,
            self.held_frame,
            self.conn,
            u8::from(self.kmsg),
            u8::from(self.driver_error)
        )
    }
}

fn is_ebusy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBUSY)
}

fn run(args: &Args, st: &mut Stats) -> Result<()> {
    st.mode = if args.flood { "flood" } else { "flip" };
    st.conn = args.pattern_conn;
    let t = find_target(args)?;
    let (w, h) = t.mode.size();
    let (w, h) = (w as u32, h as u32);
    let (fourcc, depth, bpp) = match args.format {
        Format::Xrgb8888 => (DrmFourcc::Xrgb8888, 24, 32),
        Format::Rgb565 => (DrmFourcc::Rgb565, 16, 16),
    };
    let fmt_name = match args.format {
        Format::Xrgb8888 => "xrgb8888",
        Format::Rgb565 => "rgb565",
    };
    println!(
        "GUEST-CLIENT START card={} conn={}-{} mode={}x{} format={}{}",
        t.path.display(),
        t.conn.interface().as_str(),
        t.conn.interface_id(),
        w,
        h,
        fmt_name,
        if args.flood { " flood=1" } else { "" }
    );
    let mut klog = KernelLog::open();
    st.kmsg = klog.available();
    let card = &t.card;
    let mut dbs = [
        card.create_dumb_buffer((w, h), fourcc, bpp)
            .context("create dumb buffer 0")?,
        card.create_dumb_buffer((w, h), fourcc, bpp)
            .context("create dumb buffer 1")?,
    ];
    let fbs = [
        card.add_framebuffer(&dbs[0], depth, bpp)
            .context("add framebuffer 0")?,
        card.add_framebuffer(&dbs[1], depth, bpp)
            .context("add framebuffer 1")?,
    ];
    let pitch = dbs[0].pitch() as usize;
    let [db0, db1] = &mut dbs;
    let mut maps = [
        card.map_dumb_buffer(db0).context("map dumb buffer 0")?,
        card.map_dumb_buffer(db1).context("map dumb buffer 1")?,
    ];

    // Flood draws both buffers once (frames 0 and 1); the normal mode draws frame 0
    // now and each frame before its flip.
    let predrawn: &[usize] = if args.flood { &[0, 1] } else { &[0] };
    for &b in predrawn {
        draw(
            maps[b].as_mut(),
            pitch,
            w as usize,
            h as usize,
            args.format,
            b as u32,
            args.pattern_conn,
        );
    }
    card.set_crtc(
        t.crtc,
        Some(fbs[0]),
        (0, 0),
        &[t.conn.handle()],
        Some(t.mode),
    )
    .context("set_crtc")?;
    if let Some(e) = klog.error() {
        st.driver_error = true;
        bail!("set_crtc: the display driver logged an error: {e}");
    }

    let timeout = Duration::from_millis(args.flip_timeout_ms);
    st.lat_us = Vec::with_capacity(args.frames as usize);
    let start = Instant::now();
    st.start = Some(start);
    let min_time = Duration::from_secs(args.min_secs);
    let mut k = 0u32;
    while k < args.frames || start.elapsed() < min_time {
        k += 1;
        let back = (k % 2) as usize;
        if !args.flood {
            draw(
                maps[back].as_mut(),
                pitch,
                w as usize,
                h as usize,
                args.format,
                k,
                args.pattern_conn,
            );
        }
        // One flip in flight. Each flip's event is read below before the next flip, so
        // EBUSY (not seen in the harness so far: ebusy=0) means a commit still
        // finishing: read our pending event if one is outstanding, else retry at once
        // (bounded, no sleep).
        let t0 = Instant::now();
        loop {
            match card.page_flip(t.crtc, fbs[back], PageFlipFlags::EVENT, None) {
                Ok(()) => break,
                Err(e) if is_ebusy(&e) => {
                    st.ebusy += 1;
                    if st.ebusy > 1000 + 10 * u64::from(k) {
                        bail!("page_flip {k}: EBUSY {} times", st.ebusy);
                    }
                    if st.events < st.flips {
                        st.events += wait_flip(card, t.crtc, timeout)
                            .with_context(|| format!("flip {} (while retrying flip {k})", k - 1))?;
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("page_flip {k}")),
            }
        }
        st.flips = k;
        // Its event (request to event is the latency, in both modes; flood does not
        // wait for anything else).
        st.events += wait_flip(card, t.crtc, timeout).with_context(|| format!("flip {k}"))?;
        st.lat_us.push(t0.elapsed().as_micros() as u64);
        // Buffer b holds frame b in flood mode.
        st.held_frame = if args.flood { back as u32 } else { k };
        if k == 1 {
            println!("GUEST-CLIENT FLIPPING");
        }
        if (!args.flood || k % 32 == 0) && klog.available() {
            if let Some(e) = klog.error() {
                st.driver_error = true;
                bail!("flip {k}: the display driver logged an error: {e}");
            }
        }
    }
    st.secs = start.elapsed().as_secs_f64();
    st.start = None;
    if let Some(e) = klog.error() {
        st.driver_error = true;
        bail!("after {k} flips: the display driver logged an error: {e}");
    }
    if st.events != st.flips {
        bail!("{} flips but {} flip events", st.flips, st.events);
    }
    // xen-drm-front marks its connector disconnected when the backend refuses a request.
    let conn_now = card
        .get_connector(t.conn.handle(), true)
        .context("probe the connector after flipping")?;
    if conn_now.state() != connector::State::Connected {
        bail!(
            "connector {}-{} is {:?} after {k} flips (the backend refused a request?)",
            t.conn.interface().as_str(),
            t.conn.interface_id(),
            conn_now.state()
        );
    }
    let frames = k;
    let total_ms = start.elapsed().as_millis();
    let mut lat_us = st.lat_us.clone();
    lat_us.sort_unstable();
    println!(
        "GUEST-CLIENT mode={}x{} format={} frames={} p50_us={} p99_us={} max_us={} total_ms={}",
        w,
        h,
        fmt_name,
        frames,
        percentile(&lat_us, 0.50),
        percentile(&lat_us, 0.99),
        lat_us.last().copied().unwrap_or(0),
        total_ms
    );
    println!("{}", st.result_line(true));
    println!(
        "GUEST-CLIENT HOLD frame={} width={w} height={h} conn={}",
        st.held_frame, args.pattern_conn
    );
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    println!("GUEST-CLIENT DONE");
    Ok(())
}

fn main() {
    let args = Args::parse();
    let mut st = Stats::default();
    if let Err(e) = run(&args, &mut st) {
        println!("GUEST-CLIENT ERROR {e:#}");
        if let Some(t) = st.start {
            st.secs = t.elapsed().as_secs_f64();
        }
        println!("{}", st.result_line(false));
        std::process::exit(1);
    }
}
