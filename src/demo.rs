//! `displback demo`: the real backend event loop on the simulated Xen, with a simulated
//! guest (behaving like Linux's xen-drm-front) drawing a moving test pattern on 1-4
//! connectors and flipping at the output's refresh rate.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::backend::server::{Server, ServerConfig};
use crate::config::{OutputKind, ZeroCopy};
use crate::displif::format::PixelFormat;
use crate::displif::request::Request;
use crate::output::headless::{self, Headless};
use crate::output::wayland::Wayland;
use crate::output::{ConnectorId, Output};
use crate::sim::frontend::{DumbBuf, FrontendSim};
use crate::sim::pattern;
use crate::sim::toolstack::Toolstack;
use crate::sim::xenstored::SimXenstored;
use crate::sim::SimXen;
use crate::xen::xenstore::XsClient;
use crate::xen::DomId;
use crate::zcopy::{Capabilities, FallbackReason, ZeroCopyGate};
use std::sync::Arc;

/// What `displback demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub connectors: u32,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// Flips per connector; 0 = until interrupted.
    pub frames: u32,
    pub out_dir: Option<PathBuf>,
    pub hold_secs: u64,
    /// Every N frames, reconfigure each connector right after its flip (0 = never).
    pub reconfigure_every: u32,
    pub output: OutputKind,
    /// Card, KMS mapping, Wayland display and surfaces.
    pub output_opts: crate::output::OutputOptions,
    /// The guest connectors' unique-ids in order (`--unique-id`); connectors beyond the
    /// list are named by [`unique_id`].
    pub unique_ids: Vec<String>,
    /// Zero-copy of the simulated guest's buffers (KMS output, through `/dev/udmabuf`).
    pub zero_copy: ZeroCopy,
    /// Measure instead of animating: the three buffers are drawn once, then flipped
    /// `frames` times, each flip waited for before the next (so its latency is its
    /// own), and a `DEMO BENCH` line reports the backend thread's CPU time per flip and
    /// the flip latency percentiles.
    pub bench: bool,
    /// Print a `DEMO PROGRESS frame=N ...` line (with the Wayland output's counters) at
    /// most once a second while flipping.
    pub progress: bool,
    /// Wayland output: flip the first frame until the compositor has presented one before
    /// animating, and the last frame again until presented before `DEMO HOLD`; each wait
    /// fails after this long. Zero = no waits.
    pub wait_presented: Duration,
}

/// The zero-copy gate of the demo: the simulated Xen's exports are udmabufs of the
/// guest's memfd pages ([`crate::zcopy::sim::UdmabufExporter`]); the KMS output imports
/// them, the Wayland output hands them to the compositor (`zwp_linux_dmabuf_v1`). `on`
/// refuses to run without `/dev/udmabuf` or with another output.
fn zero_copy_gate(policy: ZeroCopy, output: OutputKind, sim: &SimXen) -> Result<ZeroCopyGate> {
    if policy == ZeroCopy::Off {
        return Ok(ZeroCopyGate::off());
    }
    if !matches!(output, OutputKind::Kms | OutputKind::Wayland) {
        if policy == ZeroCopy::On {
            bail!("--zero-copy on needs the KMS or Wayland output ({output:?} copies every frame)");
        }
        return Ok(ZeroCopyGate::off());
    }
    let ops = match sim.udmabuf_exporter(BACKEND) {
        Ok(ops) => ops,
        Err(e) if policy == ZeroCopy::On => bail!(
            "--zero-copy on: cannot open {}: {e}; the simulated Xen exports guest pages as \
             dma-bufs through udmabuf (kernel option CONFIG_UDMABUF, or `modprobe udmabuf`)",
            crate::zcopy::udmabuf::DEVICE
        ),
        Err(e) => {
            warn!(
                "zero-copy off: cannot open {}: {e} (CONFIG_UDMABUF); every frame is copied",
                crate::zcopy::udmabuf::DEVICE
            );
            return Ok(ZeroCopyGate::off());
        }
    };
    // The simulated backend domain maps grants like a PVH one (no PTE-mod gntdev), so
    // an EINVAL export is about the buffer; be-alloc is not simulated over udmabuf.
    let caps = Capabilities {
        export: Ok(()),
        import: Err(FallbackReason::BackendAlloc(
            "the udmabuf exporter grants no pages (be-alloc copies)".into(),
        )),
        guest_type: Some("PVH".into()),
    };
    info!(
        policy = ?policy,
        "zero-copy: guest buffers exported as udmabufs of the simulated guest's pages"
    );
    ZeroCopyGate::new(policy, Some(Arc::new(ops)), &caps)
        .map_err(|r| anyhow::anyhow!("--zero-copy {policy:?}: {r}"))
}

/// The calling thread's id (from `/proc/thread-self`, which links to `PID/task/TID`).
fn thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// A thread's user + system CPU time from `/proc/self/task/TID/stat`, in ms (clock
/// ticks are USER_HZ = 100 on Linux's x86 and Arm ABIs).
fn thread_cpu_ms(tid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 10)
}

/// The `p`-th percentile (0-100) of sorted `v`.
fn percentile(v: &[u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) * p).div_ceil(100).min(v.len() - 1)]
}

const BACKEND: DomId = DomId(0);
const GUEST: DomId = DomId(1);
const WAIT: Duration = Duration::from_secs(10);

/// `--bench`: buffers drawn once (frames 0-2 of the pattern), then `frames` flips on
/// every connector, each waited for; the backend thread's CPU time and the guest-seen
/// latency (PG_FLIP request to its flip event) per flip, as one key=value line.
fn bench(
    fe: &mut FrontendSim,
    bufs: &[Vec<(DumbBuf, u64)>],
    opts: &DemoOptions,
    backend_tid: Option<u32>,
) -> Result<()> {
    for (c, set) in bufs.iter().enumerate() {
        for (i, (buf, _)) in set.iter().enumerate().skip(1) {
            draw(buf, opts.format, i as u32, c as u32)?;
        }
    }
    let tid = backend_tid.context("the backend thread's id is unknown")?;
    let cpu0 = thread_cpu_ms(tid).context("reading the backend thread's CPU time")?;
    let started = Instant::now();
    let mut lat_us = Vec::with_capacity(opts.frames as usize * bufs.len());
    for frame in 1..=opts.frames {
        let back = (frame % 3) as usize;
        for (c, set) in bufs.iter().enumerate() {
            let t = Instant::now();
            fe.page_flip(c as u32, set[back].1)?;
            fe.wait_flip_event(c as u32, set[back].1, Duration::from_millis(3100))?;
            lat_us.push(t.elapsed().as_micros() as u64);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = thread_cpu_ms(tid).context("reading the backend thread's CPU time")?;
    lat_us.sort_unstable();
    let flips = lat_us.len() as u64;
    let cpu_ms = cpu1.saturating_sub(cpu0);
    println!(
        "DEMO BENCH width={} height={} flips={flips} seconds={secs:.2} backend_cpu_ms={cpu_ms} \
         cpu_us_per_flip={} p50_us={} p99_us={} max_us={} redraw=0",
        opts.width,
        opts.height,
        cpu_ms * 1000 / flips.max(1),
        percentile(&lat_us, 50),
        percentile(&lat_us, 99),
        lat_us.last().copied().unwrap_or(0),
    );
    Ok(())
}

/// Draw pattern frame `frame` of connector `conn` into a dumb buffer.
pub fn draw(buf: &DumbBuf, format: PixelFormat, frame: u32, conn: u32) -> Result<()> {
    let row_len = format.min_pitch(buf.width).context("width")? as usize;
    let mut row = vec![0u8; row_len];
    for y in 0..buf.height {
        pattern::draw_row(format, frame, conn, y, &mut row);
        buf.region().write(y as usize * buf.pitch as usize, &row)?;
    }
    Ok(())
}

/// Reconfigure connector `conn` while the flip to `fb` may still be in flight: odd
/// rounds disable it and enable it again showing `fb`, even rounds switch to half the
/// resolution (the top-left quarter of `fb`) and back. Either way the flip's event
/// still comes (reported as superseded), and the connector ends as configured before.
/// The flip of `fb` and both SET_CONFIGs go on the ring together (one notify), so the
/// backend meets the modeset with that flip still in flight rather than by chance.
fn flip_and_reconfigure(
    fe: &mut FrontendSim,
    conn: u32,
    fb: u64,
    opts: &DemoOptions,
    bpp: u32,
    round: u32,
) -> Result<()> {
    let config = FrontendSim::config_request;
    let first = if round % 2 == 1 {
        config(0, 0, 0, 0)
    } else {
        config(fb, opts.width / 2, opts.height / 2, bpp)
    };
    fe.request_batch_ok(
        conn,
        &[
            Request::PgFlip { fb_cookie: fb },
            first,
            config(fb, opts.width, opts.height, bpp),
        ],
    )?;
    Ok(())
}

/// The guest connector names the demo uses: KMS-style, so they match QEMU's `Virtual-1`.
pub fn unique_id(conn: u32) -> String {
    format!("Virtual-{}", conn + 1)
}

type WlStats = Arc<std::sync::Mutex<crate::output::wayland::WaylandStats>>;

fn wl_snapshot(s: &WlStats) -> Result<crate::output::wayland::WaylandStats> {
    Ok(*s
        .lock()
        .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?)
}

/// Flip `frame` (drawn into buffers `a` and `b` of every connector, alternately; the
/// last flip is of `b`) until one round of flips was presented on every connector by the
/// compositor, or fail after `limit`. Returns the rounds flipped.
#[allow(clippy::too_many_arguments)]
fn flip_until_presented(
    fe: &mut FrontendSim,
    bufs: &[Vec<(DumbBuf, u64)>],
    stats: &WlStats,
    opts: &DemoOptions,
    frame: u32,
    (a, b): (usize, usize),
    limit: Duration,
    what: &str,
) -> Result<u32> {
    for (c, set) in bufs.iter().enumerate() {
        draw(&set[a].0, opts.format, frame, c as u32)?;
        draw(&set[b].0, opts.format, frame, c as u32)?;
    }
    let deadline = Instant::now() + limit;
    let mut rounds = 0u32;
    loop {
        let mut all = true;
        for idx in [a, b] {
            let before = wl_snapshot(stats)?.presented;
            for (c, set) in bufs.iter().enumerate() {
                fe.page_flip(c as u32, set[idx].1)?;
            }
            for (c, set) in bufs.iter().enumerate() {
                fe.wait_flip_event(c as u32, set[idx].1, Duration::from_millis(3100))?;
            }
            all = wl_snapshot(stats)?.presented >= before + bufs.len() as u64;
        }
        rounds += 1;
        if all {
            return Ok(rounds);
        }
        if Instant::now() >= deadline {
            let s = wl_snapshot(stats)?;
            bail!(
                "--wait-presented: the compositor presented no {what} frame within {:?} \
                 ({rounds} rounds of flips; connects={} presented={} unshown={} simulated={})",
                limit,
                s.connects,
                s.presented,
                s.unshown,
                s.simulated
            );
        }
    }
}

/// One `DEMO PROGRESS` line: the frame flipped last and the Wayland counters.
fn progress_line(frame: u32, stats: Option<&WlStats>) -> Result<()> {
    match stats {
        Some(s) => {
            let s = wl_snapshot(s)?;
            println!(
                "DEMO PROGRESS frame={frame} connects={} disconnects={} presented={} \
                 unshown={} simulated={}",
                s.connects, s.disconnects, s.presented, s.unshown, s.simulated
            );
        }
        None => println!("DEMO PROGRESS frame={frame}"),
    }
    Ok(())
}

/// Run the demo.
pub fn run(opts: DemoOptions) -> Result<()> {
    let signals = crate::xen::signals::StopSignals::install()?;
    let sim = SimXen::new();
    let xenstored = SimXenstored::new();
    // First: `--zero-copy on` without udmabuf refuses before anything opens.
    let gate = zero_copy_gate(opts.zero_copy, opts.output, &sim)?;
    let mut wl_stats = None;
    let (output, view): (Box<dyn Output + Send>, _) = match opts.output {
        OutputKind::Headless => {
            let h = Headless::new();
            let view = h.snapshot_handle();
            (Box::new(h), Some(view))
        }
        OutputKind::Wayland => {
            let w = Wayland::open(None, opts.output_opts.wayland.clone())?;
            wl_stats = Some(w.stats_handle());
            (Box::new(w), None)
        }
        kind => (crate::output::open(kind, &opts.output_opts)?, None),
    };
    let mut server = Server::new(
        sim.platform(&xenstored, BACKEND)?,
        output,
        ServerConfig::default(),
    )?
    .with_zero_copy(gate);
    server.stop_on_readable(signals.as_raw_fd())?;
    let stop = server.stop_handle();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let backend = std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || {
            let _ = tid_tx.send(thread_id());
            server.run()
        })?;
    let backend_tid = tid_rx.recv().ok().flatten();

    let result = (|| -> Result<()> {
        let mut toolstack = Toolstack::new(XsClient::from_stream(xenstored.connect(0)?)?);
        let conns: Vec<(String, u32, u32)> = (0..opts.connectors)
            .map(|c| {
                let id = opts.unique_ids.get(c as usize).cloned();
                (id.unwrap_or_else(|| unique_id(c)), opts.width, opts.height)
            })
            .collect();
        toolstack.add_vdispl(BACKEND, GUEST, 0, false, &conns)?;
        let mut fe = FrontendSim::new(
            &sim,
            XsClient::from_stream(xenstored.connect(GUEST.0)?)?,
            GUEST,
            0,
        )?;
        fe.wait_connected(WAIT)?;
        info!("guest connected with {} connectors", fe.connectors().len());

        let bpp = opts.format.bpp();
        let fourcc = opts.format.fourcc();
        // Three buffers per connector: one on screen, one flipping, one being drawn, so
        // drawing overlaps the wait for the vblank and the guest keeps up with 60 Hz.
        let mut bufs = Vec::new();
        for c in 0..opts.connectors {
            let mut pair = Vec::new();
            for _ in 0..3 {
                let buf = fe.create_dumb(opts.width, opts.height, bpp)?;
                let fb = fe.attach_fb(&buf, opts.width, opts.height, fourcc)?;
                pair.push((buf, fb));
            }
            draw(&pair[0].0, opts.format, 0, c)?;
            fe.set_config(c, pair[0].1, opts.width, opts.height, bpp)?;
            bufs.push(pair);
        }
        if opts.bench {
            return bench(&mut fe, &bufs, &opts, backend_tid);
        }
        let waiting = !opts.wait_presented.is_zero();
        let wait_stats = match (&wl_stats, waiting) {
            (Some(s), true) => Some(s.clone()),
            (None, true) => bail!("--wait-presented needs the Wayland output"),
            _ => None,
        };
        if let Some(s) = &wait_stats {
            // Ends with buffer 0 on screen, as the animation expects.
            let rounds = flip_until_presented(
                &mut fe,
                &bufs,
                s,
                &opts,
                0,
                (1, 0),
                opts.wait_presented,
                "first",
            )?;
            println!("DEMO PRESENTED first frame=0 rounds={rounds}");
        }
        let started = Instant::now();
        let mut last_progress = started;
        let mut reconfigs = 0u32;
        let mut frame = 0u32;
        let mut in_flight: Option<usize> = None;
        while opts.frames == 0 || frame < opts.frames {
            frame += 1;
            let back = (frame % 3) as usize;
            for (c, pair) in bufs.iter().enumerate() {
                draw(&pair[back].0, opts.format, frame, c as u32)?;
            }
            if let Some(prev) = in_flight {
                for (c, pair) in bufs.iter().enumerate() {
                    fe.wait_flip_event(c as u32, pair[prev].1, Duration::from_millis(3100))?;
                }
            }
            let reconfig = opts.reconfigure_every > 0 && frame % opts.reconfigure_every == 0;
            if reconfig {
                reconfigs += 1;
            }
            for (c, pair) in bufs.iter().enumerate() {
                if reconfig {
                    flip_and_reconfigure(&mut fe, c as u32, pair[back].1, &opts, bpp, reconfigs)?;
                } else {
                    fe.page_flip(c as u32, pair[back].1)?;
                }
            }
            in_flight = Some(back);
            if opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                progress_line(frame, wl_stats.as_ref())?;
            }
        }
        if let Some(prev) = in_flight {
            for (c, pair) in bufs.iter().enumerate() {
                fe.wait_flip_event(c as u32, pair[prev].1, Duration::from_millis(3100))?;
            }
        }
        if let (Some(s), Some(last)) = (&wait_stats, in_flight) {
            // The last frame is in `last`: flip it again (from the two other buffers,
            // ending on `last`) until the compositor presented it.
            let other = (last + 1) % 3;
            let rounds = flip_until_presented(
                &mut fe,
                &bufs,
                s,
                &opts,
                frame,
                (other, last),
                opts.wait_presented,
                "last",
            )?;
            println!("DEMO PRESENTED last frame={frame} rounds={rounds}");
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "DEMO flips={} connectors={} reconfigs={reconfigs} seconds={secs:.2} fps={:.1}",
            frame,
            opts.connectors,
            f64::from(frame) / secs.max(1e-9)
        );
        if let Some(s) = &wl_stats {
            let s = *s
                .lock()
                .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
            println!(
                "DEMO WAYLAND connects={} disconnects={} presented={} unshown={} simulated={} \
                 ivi_surfaces={} xdg_surfaces={} zero_copy={} copied={} dmabuf_refused={} \
                 dmabuf_imported={}",
                s.connects,
                s.disconnects,
                s.presented,
                s.unshown,
                s.simulated,
                s.ivi_surfaces,
                s.xdg_surfaces,
                s.zero_copy,
                s.copied,
                s.dmabuf_refused,
                s.dmabuf_imported
            );
        }
        for c in 0..opts.connectors {
            println!(
                "DEMO HOLD frame={frame} conn={c} width={} height={}",
                opts.width, opts.height
            );
        }
        if let (Some(dir), Some(view)) = (&opts.out_dir, &view) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for c in 0..opts.connectors {
                let id = ConnectorId {
                    dom: GUEST,
                    dev: 0,
                    idx: c,
                };
                let image = view.frame(id).context("no frame shown")?;
                let path = dir.join(format!("conn{c}.png"));
                headless::write_png(&image, &path)?;
                println!("DEMO PNG {}", path.display());
            }
        }
        std::thread::sleep(Duration::from_secs(opts.hold_secs));
        for pair in bufs {
            for (buf, fb) in pair {
                fe.detach_fb(fb)?;
                fe.destroy_dumb(buf)?;
            }
        }
        Ok(())
    })();
    stop.stop();
    backend
        .join()
        .map_err(|_| anyhow::anyhow!("backend thread panicked"))??;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--reconfigure-every`: each round's flip and its two SET_CONFIGs go out as one
    /// batch, are all answered 0, and the demo ends with every flip's event.
    #[test]
    fn demo_reconfigures_with_the_flip_in_one_batch() {
        let opts = DemoOptions {
            connectors: 2,
            width: 16,
            height: 8,
            format: PixelFormat::Xrgb8888,
            // 3 rounds: 7 SET_CONFIGs per connector, within the burst of the per-connector
            // config rate limit (more would be refused with EBUSY, as for a guest).
            frames: 12,
            out_dir: None,
            hold_secs: 0,
            reconfigure_every: 4,
            output: OutputKind::Headless,
            output_opts: crate::output::OutputOptions {
                card: None,
                mapping: Default::default(),
                wayland: Default::default(),
            },
            unique_ids: Vec::new(),
            zero_copy: ZeroCopy::Off,
            bench: false,
            progress: false,
            wait_presented: Duration::ZERO,
        };
        run(opts).expect("the demo with reconfigurations");
    }
}
