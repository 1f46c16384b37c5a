//! `displback`: the Xen para-virtual display backend.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use displback::config::{FileConfig, FrameCopy, OutputKind, ZeroCopy};
use displback::demo::DemoOptions;
use displback::displif::format::PixelFormat;

#[derive(Parser, Debug)]
#[command(version, about = "Xen para-virtual display backend (vdispl / displif)")]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `displback=debug` (RUST_LOG works too).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Append logs to this file instead of stderr (never coloured; `text` under `auto`).
    #[arg(long, global = true)]
    log_file: Option<PathBuf>,
    /// Log line format: `text` (timestamps; colours only on a terminal), `json` (one object
    /// per line), or `journal` (`<N>` priority prefixes, no timestamps, for systemd's journal).
    /// The default, `auto`, is `journal` when JOURNAL_STREAM names stderr, else `text`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve every vdispl and vkbd frontend of this domain (or one guest: --domid N,
    /// --domain NAME).
    Serve(ServeArgs),
    /// Run the backend on a simulated Xen with a built-in guest drawing a test pattern.
    Demo(DemoArgs),
    /// Show what a running `displback serve` does: guests, devices, connectors, flips,
    /// refusals, budgets (read-only; asks its control socket).
    Status(StatusArgs),
    /// Start a guest's own backend (`serve --domain NAME`, the `displback@NAME` unit when
    /// systemd runs), wait until it serves, then `xl create` the guest.
    Launch(LaunchArgs),
    /// Write the man pages and shell completions (packaging; see scripts/build-deb).
    #[command(hide = true)]
    GenAssets(GenAssetsArgs),
}

#[derive(Args, Debug)]
struct LaunchArgs {
    /// The guest's xl config (its `name` keys the instance; its `vdispl` entries must name
    /// this domain as backend).
    guest_cfg: PathBuf,
    /// Arguments passed on to `xl create` after the config file (`KEY=VALUE` ones also
    /// override the config, as in xl).
    #[arg(last = true)]
    xl_args: Vec<String>,
    /// TOML config for an instance started directly (not through systemd).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start the instance directly even when systemd runs.
    #[arg(long)]
    no_systemd: bool,
    /// Seconds to wait for the instance to serve.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// The `xl` program.
    #[arg(long, default_value = "xl")]
    xl: PathBuf,
    /// Log file of an instance started directly (default /var/log/displback-NAME.log).
    #[arg(long)]
    instance_log: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct GenAssetsArgs {
    /// Output directory: man/displback.1 (+ one page per subcommand) and
    /// completions/{displback.bash,_displback,displback.fish}.
    out: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The control socket of the `displback serve` to ask.
    #[arg(long, value_name = "PATH", default_value = displback::control::DEFAULT_SOCKET)]
    socket: PathBuf,
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
    /// Wayland output: the compositor's socket, a name under $XDG_RUNTIME_DIR or an
    /// absolute path (default: the config's `[wayland] display`, $WAYLAND_DISPLAY,
    /// `wayland-0`).
    #[arg(long, value_name = "NAME")]
    wayland_display: Option<String>,
    /// Wayland output: ask for fullscreen toplevels (xdg-shell).
    #[arg(long)]
    wayland_fullscreen: bool,
    /// Wayland output: the shell of every surface (config `[wayland] shell`): `ivi`
    /// (ivi-application, surface id = the connector's numeric unique-id), `xdg`, or
    /// `auto` (ivi when offered and the id is numeric).
    #[arg(long, value_name = "SHELL", value_parser = parse_shell)]
    wayland_shell: Option<displback::output::wayland::ShellChoice>,
    /// Wayland output (serve): the compositor's pointer, keyboard and touch on a guest's
    /// surface go to that guest's vkbd device(s) (config `[wayland] seat_input`).
    #[arg(long)]
    wayland_seat_input: bool,
    /// How whole-frame copies write: `auto` times non-temporal stores against memcpy on
    /// the first frame copies and keeps the faster (config file: `frame_copy`).
    #[arg(long, value_enum)]
    frame_copy: Option<FrameCopy>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML config file (see config/displback.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve only this frontend domain.
    #[arg(long, conflicts_with = "domain")]
    domid: Option<u16>,
    /// Serve only the domain with this name (XenStore /local/domain/N/name), whatever its
    /// domid: started before the guest exists, it follows it across destroy/re-create.
    #[arg(long, value_name = "NAME")]
    domain: Option<String>,
    /// Serve displays only, no `vkbd` input devices (config file: `input = false`).
    #[arg(long)]
    no_input: bool,
    /// Zero-copy policy.
    #[arg(long, value_enum)]
    zero_copy: Option<ZeroCopy>,
    /// XenStore node that reads `ready` once serving and `dead` after a clean stop
    /// (default: <own domain path>/displback/status; relative paths are under the own
    /// domain path; `none`: no node).
    #[arg(long, value_name = "PATH")]
    status_node: Option<String>,
    /// Control socket for `displback status` (default: /run/displback/control; `none`:
    /// no socket).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
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
    /// Every N frames, right after a flip (still in flight), reconfigure each connector:
    /// alternately disable + re-enable it, and switch to half the resolution and back
    /// (a test of the output's modeset paths; 0 = never).
    #[arg(long, default_value_t = 0)]
    reconfigure_every: u32,
    /// TOML config file: its output, card, connectors and [wayland] tables apply (the
    /// demo's connectors are named Virtual-1..4 unless `--unique-id` names them).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The unique-id of the next guest connector (repeat for each; default
    /// `Virtual-N`). A numeric one is the connector's ivi surface id on the Wayland
    /// output, as `connectors=1000:1920x1080` in xl.cfg.
    #[arg(long = "unique-id", value_name = "ID", value_parser = parse_unique_id)]
    unique_ids: Vec<String>,
    /// Zero-copy of the simulated guest's buffers: the KMS output imports them as
    /// dma-bufs made by /dev/udmabuf of the guest's own pages (`on`: refuse to run
    /// without it).
    #[arg(long, value_enum, default_value = "off")]
    zero_copy: ZeroCopy,
    /// Measure: draw the buffers once, flip --frames times (each waited for) and print
    /// the backend's CPU time per flip and the flip latency (`DEMO BENCH ...`).
    #[arg(long)]
    bench: bool,
    /// Print `DEMO PROGRESS frame=N ...` (with the Wayland output's connects,
    /// disconnects, presented, unshown and simulated counters) at most once a second
    /// while flipping.
    #[arg(long)]
    progress: bool,
    /// Wayland output: before animating, flip the first frame until the compositor has
    /// presented it on every connector (`DEMO PRESENTED first ...`); after the last
    /// frame, flip it again until presented (`DEMO PRESENTED last ...`) before
    /// `DEMO HOLD`. Each wait fails the demo after SECS (0 = no waits).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    wait_presented: u64,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or("expected UNIQUE_ID=KMS_CONNECTOR")?;
    Ok((a.to_string(), b.to_string()))
}

fn parse_shell(s: &str) -> Result<displback::output::wayland::ShellChoice, String> {
    use displback::output::wayland::ShellChoice;
    match s {
        "auto" => Ok(ShellChoice::Auto),
        "ivi" => Ok(ShellChoice::Ivi),
        "xdg" => Ok(ShellChoice::Xdg),
        _ => Err(format!("{s:?}: one of auto, ivi, xdg")),
    }
}

fn parse_unique_id(s: &str) -> Result<String, String> {
    // XenStore node value: no separators of the `connectors` list, not empty.
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b':')
    {
        return Err(format!(
            "{s:?}: 1-64 printable characters without ';' or ':'"
        ));
    }
    Ok(s.to_string())
}

fn parse_resolution(s: &str) -> Result<(u32, u32), String> {
    displback::displif::device::parse_resolution(s).ok_or_else(|| format!("{s:?} is not WxH"))
}

fn parse_format(s: &str) -> Result<PixelFormat, String> {
    PixelFormat::ALL
        .into_iter()
        .find(|f| format!("{f:?}").eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?}: one of {:?}", PixelFormat::ALL))
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `journal` if JOURNAL_STREAM names stderr, else `text`.
    Auto,
    /// Human-readable lines with timestamps; ANSI colours only on a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`).
    Json,
    /// sd-daemon `<N>` priority prefix on every line, no timestamps (journald adds its own).
    Journal,
}

fn init_logging(cli: &Cli) -> Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .context("bad --log filter")?;
    // What the sink is decides the defaults: a file is never coloured nor the journal.
    let (writer, terminal, journal) = match &cli.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            (
                BoxMakeWriter::new(std::sync::Mutex::new(file)),
                false,
                false,
            )
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
            journal_stream_is_stderr(),
        ),
    };
    let format = match cli.log_format {
        LogFormat::Auto if journal => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let ansi = terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(writer);
    match format {
        LogFormat::Auto | LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Journal => builder.with_ansi(false).event_format(JournalFormat).init(),
    }
    Ok(())
}

/// Whether systemd connected our stderr to the journal: JOURNAL_STREAM is `<st_dev>:<st_ino>`
/// of that stream (systemd.exec(5)), which still being stderr's means it was not redirected.
fn journal_stream_is_stderr() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM")
        .ok()
        .as_deref()
        .and_then(parse_journal_stream)
    else {
        return false;
    };
    // fstat(2) of a duplicate: same open file, so the same device and inode.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// sd-daemon(3) priority of a tracing level: journald strips the `<N>` prefix and keeps it.
fn journal_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7, // DEBUG, TRACE
    }
}

/// Plain text for journald: no timestamp, no colour, `<N>` in front of every line (a message
/// with newlines becomes several journal entries, each keeping the level).
struct JournalFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use std::fmt::Write;
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::{FormatFields, FormattedFields};

        let mut text = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(text, "{}", span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(text, "{{{fields}}}")?;
                    }
                }
                text.push_str(": ");
            }
        }
        ctx.format_fields(Writer::new(&mut text), event)?;
        write_journal_lines(&mut writer, *event.metadata().level(), &text)
    }
}

fn write_journal_lines(
    out: &mut impl std::fmt::Write,
    level: tracing::Level,
    text: &str,
) -> std::fmt::Result {
    let prio = journal_priority(level);
    for line in text.trim_end_matches('\n').split('\n') {
        writeln!(out, "<{prio}>{line}")?;
    }
    Ok(())
}

fn main() -> Result<()> {
    displback::harness_broken::announce();
    let cli = Cli::parse();
    init_logging(&cli)?;
    displback::harness_broken::log();
    match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Status(args) => status(args),
        Cmd::Launch(args) => {
            let code = displback::launch::run(&displback::launch::LaunchOptions {
                guest_cfg: args.guest_cfg,
                xl_args: args.xl_args,
                xl: args.xl,
                config: args.config,
                no_systemd: args.no_systemd,
                timeout: std::time::Duration::from_secs(args.timeout),
                log_file: args.instance_log,
            })?;
            std::process::exit(code)
        }
        Cmd::GenAssets(args) => gen_assets(&args.out),
        Cmd::Demo(args) => {
            let file = match &args.config {
                Some(p) => FileConfig::load(p)?,
                None => FileConfig::default(),
            };
            let mut mapping = file.connectors.clone();
            mapping.extend(args.output.map);
            let mut wayland = file.wayland.clone();
            if args.output.wayland_display.is_some() {
                wayland.display = args.output.wayland_display;
            }
            wayland.fullscreen |= args.output.wayland_fullscreen;
            if let Some(shell) = args.output.wayland_shell {
                wayland.shell = shell;
            }
            choose_frame_copy(args.output.frame_copy.or(file.frame_copy));
            displback::demo::run(DemoOptions {
                connectors: args.connectors,
                width: args.resolution.0,
                height: args.resolution.1,
                format: args.format,
                frames: args.frames,
                out_dir: args.out,
                hold_secs: args.hold_secs,
                reconfigure_every: args.reconfigure_every,
                output: args
                    .output
                    .output
                    .or(file.output)
                    .unwrap_or(OutputKind::Headless),
                output_opts: displback::output::OutputOptions {
                    card: args.output.card.or(file.card),
                    mapping,
                    wayland,
                },
                unique_ids: args.unique_ids,
                zero_copy: args.zero_copy,
                bench: args.bench,
                progress: args.progress,
                wait_presented: std::time::Duration::from_secs(args.wait_presented),
            })
        }
    }
}

/// How frame copies write (`--frame-copy`; `auto` measures the first frame copies).
fn choose_frame_copy(setting: Option<FrameCopy>) {
    displback::output::frame_copy::set_frame_copy(setting.unwrap_or_default());
    tracing::info!(
        "frame copies: {}",
        displback::output::frame_copy::frame_copy_state()
    );
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
    // `--domain` picks the guest: a `domid` in the shared config file does not apply then.
    let domid = match args.domain {
        Some(_) => None,
        None => args.domid.or(file.domid),
    };
    let domain = args
        .domain
        .as_deref()
        .map(displback::domain_name::DomainSelector::new)
        .transpose()
        .context("--domain")?;
    let announce = displback::serve::Announce {
        status_node: args.status_node.or(file.status_node),
        control_socket: args.control_socket.or(file.control_socket),
    };
    let mut wayland = file.wayland.clone();
    if args.out.wayland_display.is_some() {
        wayland.display = args.out.wayland_display;
    }
    wayland.fullscreen |= args.out.wayland_fullscreen;
    wayland.seat_input |= args.out.wayland_seat_input;
    if let Some(shell) = args.out.wayland_shell {
        wayland.shell = shell;
    }
    choose_frame_copy(args.out.frame_copy.or(file.frame_copy));
    displback::serve::run(
        output,
        displback::output::OutputOptions {
            card,
            mapping,
            wayland,
        },
        domid,
        domain,
        zero_copy,
        file.limits,
        announce,
        displback::input::InputConfig {
            disabled: args.no_input || file.input == Some(false),
            sources: file.inputs.clone(),
        },
    )
}

/// Man pages and completions from the clap definitions. A hidden subcommand rather
/// than a build script or a second binary: the `Cli` type lives here, and the pages then
/// describe exactly the binary that is shipped (scripts/build-deb runs it on the host
/// build of the same source).
fn gen_assets(out: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command().name("displback");
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    // Hidden subcommands get no page.
    let _ = std::fs::remove_file(man.join("displback-gen-assets.1"));
    for (shell, file) in [
        (clap_complete::Shell::Bash, "displback.bash"),
        (clap_complete::Shell::Zsh, "_displback"),
        (clap_complete::Shell::Fish, "displback.fish"),
    ] {
        let mut f = std::fs::File::create(comp.join(file))?;
        clap_complete::generate(shell, &mut cmd.clone(), "displback", &mut f);
    }
    Ok(())
}

fn status(args: StatusArgs) -> Result<()> {
    let answer =
        displback::control::query(&args.socket, args.json, std::time::Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "asking displback at {} (is `displback serve` running, and are you root?)",
                    args.socket.display()
                )
            })?;
    if let Some(err) = answer.strip_prefix("error: ") {
        anyhow::bail!("displback answered: {}", err.trim_end());
    }
    print!("{answer}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_parses_dev_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn wayland_shell_and_unique_id_arguments() {
        use displback::output::wayland::ShellChoice;
        assert_eq!(parse_shell("ivi"), Ok(ShellChoice::Ivi));
        assert_eq!(parse_shell("xdg"), Ok(ShellChoice::Xdg));
        assert_eq!(parse_shell("auto"), Ok(ShellChoice::Auto));
        assert!(parse_shell("IVI").is_err());
        assert_eq!(parse_unique_id("1000").as_deref(), Ok("1000"));
        assert_eq!(parse_unique_id("guest-hdmi").as_deref(), Ok("guest-hdmi"));
        // Separators of xl.cfg's `connectors=` list, blanks, empty, too long: refused.
        for bad in ["", "a;b", "1000:640x480", "a b", "x\n", &"9".repeat(65)] {
            assert!(parse_unique_id(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "displback",
            "demo",
            "--output",
            "wayland",
            "--wayland-shell",
            "ivi",
            "--unique-id",
            "1000",
            "--unique-id",
            "1001",
        ])
        .unwrap();
        let Cmd::Demo(d) = cli.cmd else {
            panic!("not demo");
        };
        assert_eq!(d.unique_ids, ["1000", "1001"]);
        assert_eq!(d.output.wayland_shell, Some(ShellChoice::Ivi));
    }

    #[test]
    fn journal_lines_each_carry_the_priority() {
        let mut out = String::new();
        write_journal_lines(&mut out, tracing::Level::WARN, "one\ntwo").unwrap();
        assert_eq!(out, "<4>one\n<4>two\n");
        let cases = [
            (tracing::Level::ERROR, "<3>"),
            (tracing::Level::INFO, "<6>"),
            (tracing::Level::DEBUG, "<7>"),
            (tracing::Level::TRACE, "<7>"),
        ];
        for (level, want) in cases {
            let mut out = String::new();
            write_journal_lines(&mut out, level, "x").unwrap();
            assert_eq!(out, format!("{want}x\n"));
        }
    }
}
