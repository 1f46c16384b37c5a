//! `displback demo`: the real backend event loop on the simulated Xen, with a simulated
//! guest (behaving like Linux's xen-drm-front) drawing a moving test pattern on 1-4
//! connectors and flipping at the output's refresh rate.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::info;

use crate::backend::server::{Server, ServerConfig};
use crate::config::OutputKind;
use crate::displif::format::PixelFormat;
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
}

const BACKEND: DomId = DomId(0);
const GUEST: DomId = DomId(1);
const WAIT: Duration = Duration::from_secs(10);

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
fn reconfigure(
    fe: &mut FrontendSim,
    conn: u32,
    fb: u64,
    opts: &DemoOptions,
    bpp: u32,
    round: u32,
) -> Result<()> {
    if round % 2 == 1 {
        fe.set_config(conn, 0, 0, 0, 0)?;
    } else {
        fe.set_config(conn, fb, opts.width / 2, opts.height / 2, bpp)?;
    }
    fe.set_config(conn, fb, opts.width, opts.height, bpp)?;
    Ok(())
}

/// The guest connector names the demo uses: KMS-style, so they match QEMU's `Virtual-1`.
pub fn unique_id(conn: u32) -> String {
    format!("Virtual-{}", conn + 1)
}

/// Run the demo.
pub fn run(opts: DemoOptions) -> Result<()> {
    let signals = crate::xen::signals::StopSignals::install()?;
    let sim = SimXen::new();
    let xenstored = SimXenstored::new();
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
    )?;
    server.stop_on_readable(signals.as_raw_fd())?;
    let stop = server.stop_handle();
    let backend = std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || server.run())?;

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
        let started = Instant::now();
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
            for (c, pair) in bufs.iter().enumerate() {
                fe.page_flip(c as u32, pair[back].1)?;
            }
            in_flight = Some(back);
            if opts.reconfigure_every > 0 && frame % opts.reconfigure_every == 0 {
                reconfigs += 1;
                for (c, pair) in bufs.iter().enumerate() {
                    reconfigure(&mut fe, c as u32, pair[back].1, &opts, bpp, reconfigs)?;
                }
            }
        }
        if let Some(prev) = in_flight {
            for (c, pair) in bufs.iter().enumerate() {
                fe.wait_flip_event(c as u32, pair[prev].1, Duration::from_millis(3100))?;
            }
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
                 ivi_surfaces={} xdg_surfaces={}",
                s.connects,
                s.disconnects,
                s.presented,
                s.unshown,
                s.simulated,
                s.ivi_surfaces,
                s.xdg_surfaces
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
