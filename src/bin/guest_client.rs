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

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
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

/// Waits (with a timeout) for the page-flip event of `crtc`.
fn wait_flip(card: &Card, crtc: crtc::Handle, timeout: Duration) -> Result<()> {
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
        for ev in card.receive_events().context("read DRM events")? {
            if let Event::PageFlip(pf) = ev {
                if pf.crtc == crtc {
                    return Ok(());
                }
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

fn run(args: &Args) -> Result<()> {
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
        "GUEST-CLIENT START card={} conn={}-{} mode={}x{} format={}",
        t.path.display(),
        t.conn.interface().as_str(),
        t.conn.interface_id(),
        w,
        h,
        fmt_name
    );
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

    draw(
        maps[0].as_mut(),
        pitch,
        w as usize,
        h as usize,
        args.format,
        0,
        args.pattern_conn,
    );
    card.set_crtc(
        t.crtc,
        Some(fbs[0]),
        (0, 0),
        &[t.conn.handle()],
        Some(t.mode),
    )
    .context("set_crtc")?;

    let timeout = Duration::from_millis(args.flip_timeout_ms);
    let mut lat_us = Vec::with_capacity(args.frames as usize);
    let start = Instant::now();
    let min_time = Duration::from_secs(args.min_secs);
    let mut k = 0u32;
    while k < args.frames || start.elapsed() < min_time {
        k += 1;
        let back = (k % 2) as usize;
        draw(
            maps[back].as_mut(),
            pitch,
            w as usize,
            h as usize,
            args.format,
            k,
            args.pattern_conn,
        );
        let t0 = Instant::now();
        card.page_flip(t.crtc, fbs[back], PageFlipFlags::EVENT, None)
            .with_context(|| format!("page_flip {k}"))?;
        wait_flip(card, t.crtc, timeout).with_context(|| format!("flip {k}"))?;
        lat_us.push(t0.elapsed().as_micros() as u64);
        if k == 1 {
            println!("GUEST-CLIENT FLIPPING");
        }
    }
    let frames = k;
    let total_ms = start.elapsed().as_millis();
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
    println!(
        "GUEST-CLIENT HOLD frame={frames} width={w} height={h} conn={}",
        args.pattern_conn
    );
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    println!("GUEST-CLIENT DONE");
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        println!("GUEST-CLIENT ERROR {e:#}");
        std::process::exit(1);
    }
}
