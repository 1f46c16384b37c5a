//! Scan-out readback for the VM harnesses (scripts/domu-test): checks that what a KMS card
//! scans out is frame `--frame` of the test pattern (`displback::sim::pattern`).
//!
//! For a display the host cannot screendump (VKMS in a driver domain), this reads the
//! memory the display engine reads: every CRTC's current framebuffer (GETFB2, root), its
//! GEM buffer exported as a dma-buf and mapped. It polls until one CRTC shows the frame
//! exactly or `--timeout-secs` pass, and prints one machine-readable line:
//! `SCANOUT-CHECK ok=1|0 ...` (with the differing pixel count and pages on failure).

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use displback::output::kms::Card;
use drm::buffer::DrmFourcc;
use drm::control::Device as ControlDevice;

#[derive(Parser, Debug)]
#[command(about = "Check that a KMS card scans out a frame of the displback test pattern")]
struct Args {
    /// DRM card to read back.
    #[arg(long, default_value = "/dev/dri/card0")]
    card: PathBuf,
    /// Pattern frame number expected on screen.
    #[arg(long)]
    frame: u32,
    /// Pattern connector number.
    #[arg(long, default_value_t = 0)]
    conn: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Also give up this many seconds after a CRTC first shows a framebuffer other than the
    /// one it showed when the check started (the client's first picture): a client that
    /// never gets its frame on screen then fails the check instead of outlasting it.
    #[arg(long)]
    settle_secs: Option<u64>,
}

/// How one scanned-out framebuffer compares with the pattern.
struct Comparison {
    desc: String,
    differ: usize,
    bad_pages: Vec<usize>,
    first: Option<(u32, u32, u32, u32)>,
}

/// Compares framebuffer `fb` (XRGB8888 or ARGB8888) with the expected frame.
fn compare(card: &Card, fb: drm::control::framebuffer::Handle, args: &Args) -> Result<Comparison> {
    let info = card
        .get_planar_framebuffer(fb)
        .map_err(|e| anyhow!("GETFB2: {e:?}"))?;
    let (w, h) = info.size();
    let format = info.pixel_format();
    let handle = info.buffers()[0].ok_or_else(|| anyhow!("GETFB2 gave no handle (not root?)"))?;
    let (pitch, offset) = (info.pitches()[0] as usize, info.offsets()[0] as usize);
    let desc = format!(
        "fb={} {w}x{h} pitch={pitch} offset={offset} {format:?}",
        u32::from(fb)
    );
    let result = (|| {
        if !matches!(format, DrmFourcc::Xrgb8888 | DrmFourcc::Argb8888) {
            bail!("{desc}: only XRGB8888/ARGB8888 is checked");
        }
        let flags = (libc::O_CLOEXEC | libc::O_RDWR) as u32;
        let dmabuf = card
            .buffer_to_prime_fd(handle, flags)
            .context("PRIME export")?;
        let len = offset + pitch * h as usize;
        let map = displback::xen::mem::shared(dmabuf.as_fd(), len).context("mmap dma-buf")?;
        let mut row = vec![0u8; w as usize * 4];
        let mut cmp = Comparison {
            desc: desc.clone(),
            differ: 0,
            bad_pages: vec![],
            first: None,
        };
        for y in 0..h {
            let start = offset + y as usize * pitch;
            map.read(start, &mut row).map_err(|e| anyhow!("{e:?}"))?;
            for (x, px) in row.chunks_exact(4).enumerate() {
                let got = u32::from_le_bytes(px.try_into().unwrap()) & 0xff_ffff;
                let want =
                    displback::sim::pattern::pixel(args.frame, args.conn, x as u32, y) & 0xff_ffff;
                if got != want {
                    cmp.differ += 1;
                    cmp.first.get_or_insert((x as u32, y, got, want));
                    let page = (start + x * 4) / 4096;
                    if cmp.bad_pages.last() != Some(&page) {
                        cmp.bad_pages.push(page);
                    }
                }
            }
        }
        Ok(cmp)
    })();
    let _ = card.close_buffer(handle); // GETFB2 opened a GEM handle for us
    result
}

fn run(args: &Args) -> Result<bool> {
    let file = OpenOptions::new().read(true).write(true).open(&args.card);
    let card = Card(file.with_context(|| format!("open {}", args.card.display()))?);
    let mut deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut last = String::from("no CRTC scans out a framebuffer");
    // Each CRTC's framebuffer when the check started; the first other one starts the
    // --settle-secs clock.
    let mut initial = std::collections::HashMap::new();
    let mut settling = false;
    while Instant::now() < deadline {
        for crtc in card.resource_handles().context("resources")?.crtcs() {
            let shown = card.get_crtc(*crtc).context("get_crtc")?.framebuffer();
            let was = *initial.entry(*crtc).or_insert(shown);
            if let (Some(secs), false) = (args.settle_secs, settling) {
                if shown.is_some() && shown != was {
                    settling = true;
                    deadline = deadline.min(Instant::now() + Duration::from_secs(secs));
                }
            }
            let Some(fb) = shown else {
                continue;
            };
            match compare(&card, fb, args) {
                Ok(c) if c.differ == 0 => {
                    println!(
                        "SCANOUT-CHECK ok=1 frame={} conn={} {}: every pixel exact",
                        args.frame, args.conn, c.desc
                    );
                    return Ok(true);
                }
                Ok(c) => {
                    let (x, y, got, want) = c.first.unwrap_or_default();
                    last = format!(
                        "{}: {} pixels differ, in {} pages (first pages {:?}); first ({x},{y}) \
                         got #{got:06x} want #{want:06x}",
                        c.desc,
                        c.differ,
                        c.bad_pages.len(),
                        &c.bad_pages[..c.bad_pages.len().min(8)],
                    );
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let why = if settling {
        " (settle time ran out)"
    } else {
        ""
    };
    println!(
        "SCANOUT-CHECK ok=0 frame={} conn={} {last}{why}",
        args.frame, args.conn
    );
    Ok(false)
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            println!("SCANOUT-CHECK ok=0 error: {e:#}");
            std::process::exit(2);
        }
    }
}
