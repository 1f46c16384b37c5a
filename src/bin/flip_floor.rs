//! The floor of a page flip's CPU cost on a KMS card, for the harness's per-flip table
//! (scripts/domu-test, `arm64-cost`): what the backend's zero-copy flip cannot go below.
//!
//! Two dumb buffers of `--size` with a framebuffer each, a blocking atomic modeset of the
//! connector's mode of that size, then `--flips` flips between them, each exactly as the
//! backend submits a guest's flip (`atomic::commit_flip`: one `FB_ID` assignment,
//! `NONBLOCK | PAGE_FLIP_EVENT`) and completes it (wait on epoll for the card's fd, read
//! the event). No Xen, no ring, no guest: the rest of the backend's per-flip CPU is its
//! own. Prints one machine-readable line with this process's utime and stime (from
//! `/proc/self/stat`, in USER_HZ ticks) over the flips:
//! `FLIP-FLOOR ok=1 size=WxH flips=N utime_ticks=U stime_ticks=S user_hz=100 secs=T`,
//! or `FLIP-FLOOR ok=0 error=...` (exit 1).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use displback::output::kms::atomic::{self, AtomicState, PlaneGeom};
use displback::output::kms::Card;
use drm::buffer::DrmFourcc;
use drm::control::{connector, Device as ControlDevice, Event};
use drm::{ClientCapability, Device as _};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

#[derive(Parser, Debug)]
#[command(about = "Flip two dumb buffers on a KMS card and report the CPU per flip")]
struct Args {
    /// DRM card.
    #[arg(long, default_value = "/dev/dri/card0")]
    card: PathBuf,
    /// Connector name (as `displback serve --map`), e.g. Virtual-1; default: the first
    /// connected one.
    #[arg(long)]
    connector: Option<String>,
    /// Mode (and buffer) size, WxH.
    #[arg(long, default_value = "1920x1080")]
    size: String,
    /// Flips measured (after 10 unmeasured ones).
    #[arg(long, default_value_t = 300)]
    flips: u32,
}

/// utime and stime of this process, in USER_HZ ticks (`/proc/self/stat` fields 14, 15).
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("/proc/self/stat")?;
    let rest = stat
        .rsplit_once(") ")
        .ok_or_else(|| anyhow!("unreadable /proc/self/stat"))?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0: utime (14) is 11, stime (15) 12.
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .ok_or_else(|| anyhow!("short /proc/self/stat"))?
            .parse()
            .context("/proc/self/stat field")
    };
    Ok((get(11)?, get(12)?))
}

fn parse_size(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| anyhow!("size {s}: want WxH"))?;
    Ok((w.parse()?, h.parse()?))
}

fn run(args: &Args) -> Result<String> {
    let (w, h) = parse_size(&args.size)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.card)
        .with_context(|| format!("open {}", args.card.display()))?;
    let card = Card(file);
    card.set_client_capability(ClientCapability::UniversalPlanes, true)
        .context("universal planes")?;
    card.set_client_capability(ClientCapability::Atomic, true)
        .context("atomic")?;
    let res = card.resource_handles().context("resources")?;
    let mut chosen = None;
    for &c in res.connectors() {
        let info = card.get_connector(c, true).context("connector")?;
        let name = displback::output::kms::connector_name(info.interface(), info.interface_id());
        let wanted = match &args.connector {
            Some(n) => *n == name,
            None => info.state() == connector::State::Connected,
        };
        if wanted {
            chosen = Some((c, info, name));
            break;
        }
    }
    let (conn, info, name) = chosen.ok_or_else(|| anyhow!("no such connected connector"))?;
    let mode = *info
        .modes()
        .iter()
        .find(|m| m.size() == (w as u16, h as u16))
        .ok_or_else(|| anyhow!("{name} has no {w}x{h} mode"))?;
    let crtc = info
        .encoders()
        .iter()
        .filter_map(|&e| card.get_encoder(e).ok())
        .flat_map(|e| res.filter_crtcs(e.possible_crtcs()))
        .next()
        .ok_or_else(|| anyhow!("{name}: no CRTC"))?;
    let mut st = AtomicState::probe(&card, crtc, conn, &[], &[]).map_err(|e| anyhow!(e))?;
    let mut fbs = Vec::new();
    let mut dbs = Vec::new();
    for _ in 0..2 {
        let db = card
            .create_dumb_buffer((w, h), DrmFourcc::Xrgb8888, 32)
            .context("dumb buffer")?;
        fbs.push(card.add_framebuffer(&db, 24, 32).context("ADDFB")?);
        dbs.push(db);
    }
    atomic::commit_modeset(
        &card,
        &mut st,
        &mode,
        fbs[0],
        &PlaneGeom::full((0, 0), (w, h)),
        false,
        false,
    )
    .context("modeset")?;

    let mut poll = Poll::new().context("epoll")?;
    let raw = card.as_fd().as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&raw), Token(0), Interest::READABLE)
        .context("epoll_ctl")?;
    let mut events = Events::with_capacity(8);
    let mut flip = |i: u32| -> Result<()> {
        atomic::commit_flip(&card, &mut st, fbs[(i % 2) as usize], (0, 0), true)
            .with_context(|| format!("flip {i}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            poll.poll(&mut events, Some(Duration::from_secs(1)))
                .context("epoll_wait")?;
            if !events.is_empty()
                && card
                    .receive_events()
                    .context("read event")?
                    .any(|e| matches!(e, Event::PageFlip(_)))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("flip {i}: no flip-complete event in 10 s");
            }
        }
    };
    for i in 0..10 {
        flip(i)?;
    }
    let (u0, s0) = cpu_ticks()?;
    let t0 = Instant::now();
    for i in 10..10 + args.flips {
        flip(i)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu_ticks()?;
    for fb in fbs {
        let _ = card.destroy_framebuffer(fb);
    }
    for db in dbs {
        let _ = card.destroy_dumb_buffer(db);
    }
    Ok(format!(
        "FLIP-FLOOR ok=1 size={w}x{h} connector={name} flips={} utime_ticks={} stime_ticks={} \
         user_hz=100 secs={secs:.2}",
        args.flips,
        u1 - u0,
        s1 - s0
    ))
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            println!("FLIP-FLOOR ok=0 size={} error={e:#}", args.size);
            std::process::exit(1);
        }
    }
}
