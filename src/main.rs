//! `displback`: the Xen para-virtual display backend.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use displback::config::{FileConfig, OutputKind, ZeroCopy};
use displback::demo::DemoOptions;
use displback::displif::format::PixelFormat;

#[derive(Parser, Debug)]
#[command(version, about = "Xen para-virtual display backend (vdispl / displif)")]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `displback=debug` (RUST_LOG works too).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Append logs to this file instead of stderr.
    #[arg(long, global = true)]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve every vdispl frontend of this domain (or one, with --domid).
    Serve(ServeArgs),
    /// Run the backend on a simulated Xen with a built-in guest drawing a test pattern.
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
struct OutputArgs {
    /// Where frames go (default: kms for serve, headless for demo).
    #[arg(long, value_enum)]
    output: Option<OutputKind>,
    /// DRM card (default: the first card with connectors and CRTCs).
    #[arg(long)]
    card: Option<PathBuf>,
    /// Map a guest connector unique-id to a KMS connector name: `--map guest-hdmi=HDMI-A-1`.
    #[arg(long = "map", value_parser = parse_mapping)]
    map: Vec<(String, String)>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML config file (see config/displback.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve only this frontend domain.
    #[arg(long)]
    domid: Option<u16>,
    /// Zero-copy policy.
    #[arg(long, value_enum)]
    zero_copy: Option<ZeroCopy>,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Number of guest connectors (1-4).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    connectors: u32,
    /// Guest connector resolution.
    #[arg(long, default_value = "1024x768", value_parser = parse_resolution)]
    resolution: (u32, u32),
    /// Pixel format the guest draws in.
    #[arg(long, default_value = "xrgb8888", value_parser = parse_format)]
    format: PixelFormat,
    /// Stop after this many flips per connector (0 = run until interrupted).
    #[arg(long, default_value_t = 120)]
    frames: u32,
    /// Write each connector's last frame as PNG into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the last frame on screen this long before exiting.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or("expected UNIQUE_ID=KMS_CONNECTOR")?;
    Ok((a.to_string(), b.to_string()))
}

fn parse_resolution(s: &str) -> Result<(u32, u32), String> {
    displback::backend::frontend::parse_resolution(s).ok_or_else(|| format!("{s:?} is not WxH"))
}

fn parse_format(s: &str) -> Result<PixelFormat, String> {
    PixelFormat::ALL
        .into_iter()
        .find(|f| format!("{f:?}").eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?}: one of {:?}", PixelFormat::ALL))
}

fn init_logging(cli: &Cli) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .context("bad --log filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &cli.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli)?;
    match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Demo(args) => {
            let mapping: HashMap<String, String> = args.output.map.into_iter().collect();
            displback::demo::run(DemoOptions {
                connectors: args.connectors,
                width: args.resolution.0,
                height: args.resolution.1,
                format: args.format,
                frames: args.frames,
                out_dir: args.out,
                hold_secs: args.hold_secs,
                output: args.output.output.unwrap_or(OutputKind::Headless),
                card: args.output.card,
                mapping,
            })
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut mapping = file.connectors.clone();
    mapping.extend(args.out.map);
    let output = args.out.output.or(file.output).unwrap_or_default();
    let card = args.out.card.or(file.card);
    let zero_copy = args.zero_copy.or(file.zero_copy).unwrap_or_default();
    let domid = args.domid.or(file.domid);
    displback::serve::run(
        output,
        card.as_deref(),
        mapping,
        domid,
        zero_copy,
        file.limits,
    )
}
