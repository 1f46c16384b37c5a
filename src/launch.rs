//! `displback launch GUEST.cfg [-- XL_CREATE_ARGS]`: start the guest's own backend
//! (`displback serve --domain NAME`) first, wait until it serves, then `xl create`.
//!
//! libxl gives a backend 10 s to answer a new device, and a guest's domid is unknown
//! until `xl create` runs: so the per-guest instance is keyed by the guest's *name* (read
//! from its xl.cfg), started before the guest exists, and follows the domain with that
//! name across destroy/re-create.
//!
//! The xl.cfg parser reads the subset of libxlu's syntax (`xl.cfg(5)`) needed to find
//! `name` and the `vdispl` entries; the file is the administrator's, but it is parsed
//! defensively anyway (bounded size, no panics, errors with line numbers).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::xenstore::{Tx, XsClient};
use crate::domain_name::validate_name;

/// Biggest xl.cfg read (real ones are a few hundred bytes).
pub const MAX_CFG_BYTES: usize = 1 << 20;

/// A value in an xl.cfg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Str(String),
    /// Numbers (and bare words libxlu accepts as numbers) as written.
    Num(String),
    List(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Num(s) => Some(s),
            Value::List(_) => None,
        }
    }
}

/// A parse error with its 1-based line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

/// Parse xl.cfg text into its settings, in order (a repeated key: the last wins, as in
/// libxlu; `+=` appends to a list).
pub fn parse(text: &str) -> Result<Vec<(String, Value)>, ParseError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        line: 1,
    };
    let mut out: Vec<(String, Value)> = Vec::new();
    loop {
        p.skip_blank(true);
        if p.i >= p.s.len() {
            return Ok(out);
        }
        let key = p.ident()?;
        p.skip_blank(false);
        let append = if p.eat(b"+=") {
            true
        } else if p.eat(b"=") {
            false
        } else {
            return Err(p.err("expected `=` or `+=` after the setting name"));
        };
        p.skip_blank(false);
        let value = p.value(0)?;
        p.skip_blank(false);
        if p.i < p.s.len() && !p.eat(b";") && !p.eat(b"\n") {
            return Err(p.err("expected the end of the line after the value"));
        }
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, Value::List(old))) if append => match value {
                Value::List(more) => old.extend(more),
                v => old.push(v),
            },
            Some(_) if append => {
                return Err(p.err(&format!("`{key} +=` needs a list")));
            }
            Some((_, old)) => *old = value,
            None => out.push((key, value)),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> ParseError {
        ParseError {
            line: self.line,
            what: what.to_owned(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, tok: &[u8]) -> bool {
        if self.s[self.i..].starts_with(tok) {
            self.i += tok.len();
            self.line += tok.iter().filter(|&&c| c == b'\n').count();
            true
        } else {
            false
        }
    }

    /// Spaces, tabs, comments; newlines too if `newlines`.
    fn skip_blank(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' => self.i += 1,
                b'\n' if newlines => {
                    self.i += 1;
                    self.line += 1;
                }
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                // A semicolon between settings is an empty statement.
                b';' if newlines => self.i += 1,
                _ => break,
            }
        }
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            self.i += 1;
        }
        let id = &self.s[start..self.i];
        if id.is_empty() || id[0].is_ascii_digit() {
            return Err(self.err("expected a setting name"));
        }
        Ok(String::from_utf8_lossy(id).into_owned())
    }

    fn value(&mut self, depth: u32) -> Result<Value, ParseError> {
        match self.peek() {
            Some(q @ (b'"' | b'\'')) => self.string(q).map(Value::Str),
            Some(b'[') if depth == 0 => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_blank(true);
                    if self.eat(b"]") {
                        return Ok(Value::List(items));
                    }
                    items.push(self.value(depth + 1)?);
                    self.skip_blank(true);
                    if self.eat(b"]") {
                        return Ok(Value::List(items));
                    }
                    if !self.eat(b",") {
                        return Err(self.err("expected `,` or `]` in the list"));
                    }
                }
            }
            Some(b'[') => Err(self.err("lists cannot be nested")),
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.') => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.'))
                {
                    self.i += 1;
                }
                Ok(Value::Num(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            None => Err(self.err("missing value at the end of the file")),
            _ => Err(self.err("expected a value (string, number or list)")),
        }
    }

    fn string(&mut self, quote: u8) -> Result<String, ParseError> {
        let start_line = self.line;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(ParseError {
                    line: start_line,
                    what: "unterminated string".into(),
                });
            };
            self.i += 1;
            match c {
                b'\n' => {
                    return Err(ParseError {
                        line: start_line,
                        what: "newline inside a string".into(),
                    })
                }
                b'\\' => {
                    let e = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'\\' | b'\'' | b'"' => e,
                        _ => return Err(self.err("unknown escape in a string")),
                    });
                }
                c if c == quote => break,
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("a string is not UTF-8"))
    }
}

/// What `launch` needs from a guest's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    pub name: String,
    /// Each `vdispl` entry's backend domain (name or domid); libxl's default is Dom0.
    pub vdispl_backends: Vec<String>,
}

/// Extract `name` and the `vdispl` backends from parsed settings.
pub fn guest_config(settings: &[(String, Value)]) -> Result<GuestConfig> {
    let get = |k: &str| settings.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let name = get("name")
        .ok_or_else(|| anyhow!("the config has no `name`"))?
        .as_str()
        .ok_or_else(|| anyhow!("`name` must be a string"))?
        .to_owned();
    validate_name(&name).with_context(|| "the guest's `name` cannot key a displback instance")?;
    let mut vdispl_backends = Vec::new();
    match get("vdispl") {
        None => {}
        Some(Value::List(items)) => {
            for it in items {
                let spec = it
                    .as_str()
                    .ok_or_else(|| anyhow!("a `vdispl` entry must be a string"))?;
                vdispl_backends.push(vdispl_backend(spec)?);
            }
        }
        Some(_) => bail!("`vdispl` must be a list of strings"),
    }
    Ok(GuestConfig {
        name,
        vdispl_backends,
    })
}

/// The backend of one `vdispl` spec (`backend=NAME|ID,be-alloc=..,connectors=..`);
/// default `0`.
fn vdispl_backend(spec: &str) -> Result<String> {
    let mut backend = None;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            bail!("vdispl entry {spec:?}: {part:?} is not KEY=VALUE");
        };
        if k.trim() == "backend" {
            let v = v.trim();
            if v.is_empty() {
                bail!("vdispl entry {spec:?}: empty backend");
            }
            backend = Some(v.to_owned());
        }
    }
    Ok(backend.unwrap_or_else(|| "0".to_owned()))
}

/// Read and parse an xl.cfg, then apply `xl create`'s trailing `KEY=VALUE` overrides
/// (as xl does: they are parsed as extra config lines).
pub fn load_guest_config(path: &Path, xl_args: &[String]) -> Result<GuestConfig> {
    let text = read_bounded(path)?;
    let mut text = text;
    for a in xl_overrides(xl_args) {
        text.push('\n');
        text.push_str(a);
    }
    let settings = parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    guest_config(&settings).with_context(|| format!("{}", path.display()))
}

/// The `KEY=VALUE` words of an `xl create` command line (after the config file).
fn xl_overrides(args: &[String]) -> impl Iterator<Item = &str> {
    args.iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-') && a.contains('=') && !a.contains('\n'))
}

fn read_bounded(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_CFG_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() > MAX_CFG_BYTES {
        bail!("{} is larger than {MAX_CFG_BYTES} bytes", path.display());
    }
    String::from_utf8(buf).map_err(|_| anyhow!("{} is not UTF-8", path.display()))
}

/// Where a per-guest instance announces itself.
pub fn status_node_setting(name: &str) -> String {
    format!("displback/{name}/status")
}

/// The per-guest instance's control socket.
pub fn control_socket_for(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/displback/control-{name}"))
}

/// `displback launch` options.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub guest_cfg: PathBuf,
    pub xl_args: Vec<String>,
    /// `xl` to run.
    pub xl: PathBuf,
    /// displback config file given to a spawned instance.
    pub config: Option<PathBuf>,
    /// Never use systemd, spawn the instance directly.
    pub no_systemd: bool,
    /// How long to wait for the instance to be ready.
    pub timeout: Duration,
    /// Log file of a directly spawned instance (default /var/log/displback-NAME.log).
    pub log_file: Option<PathBuf>,
}

/// Start (or find) the guest's instance, wait until it serves, run `xl create`. Returns
/// `xl create`'s exit code.
pub fn run(opts: &LaunchOptions) -> Result<i32> {
    let guest = load_guest_config(&opts.guest_cfg, &opts.xl_args)?;
    let name = guest.name.as_str();
    if guest.vdispl_backends.is_empty() {
        tracing::info!("{name} has no vdispl device: no display backend needed");
        return xl_create(opts);
    }
    let mut xs = XsClient::open().context("connecting to XenStore")?;
    let own = xs.own_domid().context("reading our domain id")?;
    let own_path = xs.get_domain_path(own)?;
    let own_name = xs
        .read(Tx::NONE, &format!("{own_path}/name"))
        .ok()
        .flatten();
    for b in &guest.vdispl_backends {
        let ours = b.parse::<u16>().ok() == Some(own) || own_name.as_deref() == Some(b.as_str());
        if !ours {
            bail!(
                "{name}'s vdispl backend is {b:?}, not this domain (dom{own}{}): run \
                 `displback serve --domain {name}` there",
                own_name
                    .as_deref()
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default()
            );
        }
    }
    let node = crate::serve::status_node_path(Some(&status_node_setting(name)), &own_path)
        .ok_or_else(|| anyhow!("no status node"))?;
    let socket = control_socket_for(name);
    if instance_answers(&socket) && read_node(&mut xs, &node).as_deref() == Some("ready") {
        tracing::info!("displback for {name} already serves ({node} = ready)");
        println!("LAUNCH instance=reused name={name} node={node}");
    } else {
        let how = start_instance(opts, name)?;
        let t0 = Instant::now();
        wait_ready(&mut xs, &node, &socket, opts.timeout, how.1)
            .with_context(|| format!("waiting for displback serving {name}"))?;
        println!(
            "LAUNCH instance={} name={name} node={node} ready_ms={}",
            how.0,
            t0.elapsed().as_millis()
        );
    }
    xl_create(opts)
}

fn read_node(xs: &mut XsClient, node: &str) -> Option<String> {
    xs.read(Tx::NONE, node).ok().flatten()
}

fn instance_answers(socket: &Path) -> bool {
    crate::control::query(socket, true, Duration::from_secs(2)).is_ok()
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Start the instance; returns how, and the child if spawned directly.
fn start_instance(
    opts: &LaunchOptions,
    name: &str,
) -> Result<(&'static str, Option<std::process::Child>)> {
    use std::process::{Command, Stdio};
    if !opts.no_systemd && systemd_running() {
        // Names are [A-Za-z0-9_-]: valid unit instance strings as they are (`%i`).
        let unit = format!("displback@{name}.service");
        let st = Command::new("systemctl")
            .args(["start", &unit])
            .status()
            .context("running systemctl")?;
        if !st.success() {
            bail!("systemctl start {unit} failed ({st})");
        }
        return Ok(("systemd", None));
    }
    let exe = std::env::current_exe().context("finding our own binary")?;
    let log = opts
        .log_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/log/displback-{name}.log")));
    let mut cmd = Command::new(exe);
    cmd.arg("--log-file").arg(&log).arg("serve");
    if let Some(c) = &opts.config {
        cmd.arg("--config").arg(c);
    }
    cmd.args([
        "--domain",
        name,
        "--status-node",
        &status_node_setting(name),
    ])
    .arg("--control-socket")
    .arg(control_socket_for(name));
    use std::os::unix::process::CommandExt;
    // Its own process group: our caller's Ctrl-C does not stop the guest's backend.
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().context("starting `displback serve --domain`")?;
    tracing::info!(
        "started displback serve --domain {name} (pid {}, log {})",
        child.id(),
        log.display()
    );
    Ok(("spawned", Some(child)))
}

fn wait_ready(
    xs: &mut XsClient,
    node: &str,
    socket: &Path,
    timeout: Duration,
    mut child: Option<std::process::Child>,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(c) = child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("the instance exited ({st}) before it was ready");
            }
        }
        // `ready` alone may be a stale node of a killed instance: it must answer too.
        if read_node(xs, node).as_deref() == Some("ready") && instance_answers(socket) {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("{node} not `ready` within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn xl_create(opts: &LaunchOptions) -> Result<i32> {
    let st = std::process::Command::new(&opts.xl)
        .arg("create")
        .arg(&opts.guest_cfg)
        .args(&opts.xl_args)
        .status()
        .with_context(|| format!("running {} create", opts.xl.display()))?;
    Ok(st.code().unwrap_or(128))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<GuestConfig> {
        guest_config(&parse(text)?)
    }

    #[test]
    fn typical_config() {
        let g = cfg(r#"
# a guest
name = "guest1"
type = "pv"
memory = 256 ; vcpus = 1
vdispl = [ 'backend=Domain-0,be-alloc=0,connectors=Virtual-1:1024x768', # first
           "connectors=HDMI-A-1:800x600;DP-1:640x480",
         ]
"#)
        .unwrap();
        assert_eq!(g.name, "guest1");
        assert_eq!(g.vdispl_backends, ["Domain-0", "0"]);
    }

    #[test]
    fn the_harness_guest_config_with_xl_overrides() {
        let mut text = include_str!("../scripts/domu-test/xen/domu.cfg").to_owned();
        text.push_str("\nname=\"launchg\"\nextra=\"console=hvc0 harness.hold=5\"\n");
        let g = cfg(&text).unwrap();
        assert_eq!(g.name, "launchg");
        assert_eq!(g.vdispl_backends, ["Domain-0"]);
    }

    #[test]
    fn last_setting_wins_and_append() {
        let g =
            cfg("name='a'\nname=\"b\"\nvdispl=['backend=1']\nvdispl += ['backend=2']\n").unwrap();
        assert_eq!(g.name, "b");
        assert_eq!(g.vdispl_backends, ["1", "2"]);
    }

    #[test]
    fn no_vdispl_and_escapes() {
        let g = cfg(r#"name = "we\'ird""#).unwrap_err();
        assert!(format!("{g:#}").contains("character outside"), "{g:#}");
        let g = cfg("name = 'x'").unwrap();
        assert!(g.vdispl_backends.is_empty());
    }

    #[test]
    fn hostile_and_odd_inputs_are_errors_not_panics() {
        let bad = [
            "",                                   // no name
            "name",                               // no value
            "name =",                             // value missing at EOF
            "name = 'unterminated",               // string
            "name = 'a\nb'",                      // newline in string
            "name = 'a' 'b'",                     // junk after value
            "name = [ 'a' ]",                     // name must be a string
            "1name = 'a'",                        // bad identifier
            "name = 'a'\nvdispl = [[ 'x' ]]",     // nested list
            "name = 'a'\nvdispl = [ 'x'",         // unterminated list
            "name = 'a'\nvdispl = 'backend=0'",   // not a list
            "name = 'a'\nvdispl = [ 'backend' ]", // not KEY=VALUE
            "name = 'a'\nvdispl = [ 'backend=' ]",
            "name = 'a'\nvdispl = [ 3, ]", // a number: not KEY=VALUE
            "name = '../../etc'",          // unsafe name
            "name = 'a b'",
            "name = 'a\\qb'",            // unknown escape
            "name = 'a'\nname += ['b']", // += on a non-list
            "name = @",
            "\u{0}",
        ];
        for b in bad {
            let r = cfg(b);
            assert!(r.is_err(), "{b:?} was accepted: {r:?}");
        }
        // Deep or huge inputs stay linear and bounded.
        let long = format!("name = 'a'\nvdispl = [{}]", "'backend=0',".repeat(10_000));
        assert_eq!(cfg(&long).unwrap().vdispl_backends.len(), 10_000);
        let many_brackets = format!("name = 'a'\nx = {}", "[".repeat(100_000));
        assert!(cfg(&many_brackets).is_err());
    }

    #[test]
    fn error_lines_are_counted() {
        let e = parse("a = 1\nb = 2\n\nc = 'x\n").unwrap_err();
        assert_eq!(e.line, 4);
        let e = parse("a = [\n 1,\n 2\n 3 ]").unwrap_err();
        assert_eq!(e.line, 4);
    }

    #[test]
    fn xl_overrides_apply() {
        let dir = std::env::temp_dir().join(format!("displback-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.cfg");
        std::fs::write(&p, "name = 'g'\nvdispl = ['backend=0']\n").unwrap();
        let args = vec!["-p".to_string(), "name=\"g2\"".to_string()];
        let g = load_guest_config(&p, &args).unwrap();
        assert_eq!(g.name, "g2");
        std::fs::write(&p, vec![b'#'; MAX_CFG_BYTES + 1]).unwrap();
        assert!(load_guest_config(&p, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
