//! Readiness (GitHub issue #14, items 3 and 4): sd_notify from the event loop, the
//! XenStore status node, and the control socket behind `displback status`, each against
//! the backend on the simulated Xen.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use displback::backend::server::ServerConfig;
use displback::displif::format::PixelFormat;
use displback::notify::Notifier;
use displback::output::headless::Headless;
use displback::output::{ConnectorId, FlipDone, FrameSource, Output, OutputError};

const NODE: &str = "/local/domain/0/displback/status";

/// A datagram socket standing in for systemd's notification socket.
fn notify_socket(dir: &TempDir) -> (UnixDatagram, String) {
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    (sock, path.to_str().unwrap().to_owned())
}

/// The next datagram, waiting at most `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("notify socket: {e}"),
    }
}

/// Datagrams until one satisfies `want` (returned); fails after [`WAIT`].
fn recv_until(sock: &UnixDatagram, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match recv(sock, left) {
            Some(m) if want(&m) => return m,
            Some(m) => seen.push(m),
            None => break,
        }
    }
    panic!("no {what} within {WAIT:?}; got {seen:?}");
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn ready_after_the_first_scan_then_status_changes_and_stopping() {
    let dir = TempDir::new("ready");
    let (notify, path) = notify_socket(&dir);
    let mut rig = Rig::unstarted(ServerConfig {
        notify: Some(Notifier::new(path)),
        status_node: Some(NODE.into()),
        ..ServerConfig::default()
    });
    // A guest created before the backend runs (libxl waits for its InitWait).
    let early = rig.add_vdispl_in_background(5, &[("Virtual-1", 64, 48)]);
    let be_state = "/local/domain/0/backend/vdispl/5/0/state";
    rig.wait_node(be_state, "1");
    assert_eq!(rig.read(NODE), None);
    assert_eq!(recv(&notify, Duration::from_millis(1)), None);

    rig.start();
    let ready = recv_until(&notify, "READY=1", |m| has_line(m, "READY=1"));
    // READY carries the counts of that moment: the device present at start is already
    // handled (the scan ran first), and it is in InitWait.
    assert!(
        has_line(
            &ready,
            "STATUS=serving 1 guest: 1 device (0 connected), 0 connectors"
        ),
        "{ready:?}"
    );
    assert_eq!(
        rig.read(be_state).as_deref(),
        Some("2"),
        "not InitWait at READY"
    );
    assert_eq!(rig.read(NODE).as_deref(), Some("ready"));
    early.join().unwrap().expect("libxl saw no InitWait");

    // Counts change: a STATUS line each time.
    let mut fe = rig.connect_frontend(5);
    recv_until(&notify, "STATUS after connecting", |m| {
        has_line(
            m,
            "STATUS=serving 1 guest: 1 device (1 connected), 1 connector",
        )
    });
    // The watch is armed: a guest created now is found and served.
    let _fe6 = rig.guest(6, &[("Virtual-2", 32, 32)]);
    recv_until(&notify, "STATUS with the second guest", |m| {
        has_line(
            m,
            "STATUS=serving 2 guests: 2 devices (2 connected), 2 connectors",
        )
    });

    // Flips turn the loop many times without changing the counts: no STATUS for them.
    show_and_flip(&rig, &mut fe, 5, 0, (64, 48), 20);
    assert_eq!(recv(&notify, Duration::from_millis(100)), None);

    rig.stop_backend();
    let mut rest = Vec::new();
    while let Some(m) = recv(&notify, Duration::from_millis(200)) {
        rest.push(m);
    }
    assert!(
        rest.iter().any(|m| has_line(m, "STOPPING=1")),
        "no STOPPING=1 at a clean stop: {rest:?}"
    );
    assert_eq!(rig.read(NODE).as_deref(), Some("dead"));
}

/// A headless output whose dispatch hangs while `stall` is set: a hung event loop.
struct Stalling {
    inner: Headless,
    stall: Arc<AtomicBool>,
}

impl Output for Stalling {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError> {
        self.inner.add_connector(conn, unique_id, width, height)
    }
    fn remove_connector(&mut self, conn: ConnectorId) {
        self.inner.remove_connector(conn)
    }
    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        self.inner.set_config(conn, frame)
    }
    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        self.inner.page_flip(conn, frame)
    }
    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        while self.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.dispatch(now, done)
    }
}

#[test]
fn watchdog_is_petted_by_the_loop_and_stops_when_it_hangs() {
    let dir = TempDir::new("watchdog");
    let (notify, path) = notify_socket(&dir);
    let mut rig = Rig::unstarted(ServerConfig {
        notify: Some(Notifier::new(path).with_watchdog(Some(Duration::from_millis(50)))),
        ..ServerConfig::default()
    });
    let stall = Arc::new(AtomicBool::new(false));
    rig.start_backend(Box::new(Stalling {
        inner: Headless::new(),
        stall: stall.clone(),
    }));
    recv_until(&notify, "READY=1", |m| has_line(m, "READY=1"));
    // Nothing else happens: only the poll timeout wakes the loop to pet.
    for _ in 0..4 {
        recv_until(&notify, "WATCHDOG=1", |m| m == "WATCHDOG=1");
    }
    stall.store(true, Ordering::SeqCst);
    while recv(&notify, Duration::from_millis(150)).is_some() {}
    assert_eq!(
        recv(&notify, Duration::from_millis(400)),
        None,
        "a hung loop still pets the watchdog"
    );
    stall.store(false, Ordering::SeqCst);
    recv_until(&notify, "WATCHDOG=1 after the hang", |m| m == "WATCHDOG=1");
}

/// `displback status [--json] --socket PATH`, which must succeed.
fn status_cli(socket: &Path, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_displback"));
    cmd.args(["--log", "warn", "status", "--socket"])
        .arg(socket);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ask(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn status_json_describes_a_served_guest() {
    let dir = TempDir::new("control");
    let socket = dir.path().join("run").join("control");
    let mut rig = Rig::unstarted(ServerConfig {
        control_socket: Some(socket.clone()),
        ..ServerConfig::default()
    });
    rig.start();
    let mut fe = rig.guest(5, &[("Virtual-1", 64, 48)]);
    let _bufs = show_and_flip(&rig, &mut fe, 5, 0, (64, 48), 30);
    // One refused request: a flip of a framebuffer that does not exist.
    assert!(fe.page_flip(0, 0xdead).is_err());

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);

    let text = status_cli(&socket, true);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["backend_domid"], 0);
    assert_eq!(v["counts"]["guests"], 1);
    let guests = v["guests"].as_array().unwrap();
    assert_eq!(guests.len(), 1, "{text}");
    let g = &guests[0];
    assert_eq!(g["domid"], 5);
    let bytes = 2 * 64 * 48 * PixelFormat::Xrgb8888.bpp() as u64 / 8;
    assert_eq!(g["budget"]["bytes"], bytes, "{text}");
    assert_eq!(g["budget"]["buffers"], 2);
    assert_eq!(g["budget"]["framebuffers"], 2);
    assert_eq!(g["budget"]["bytes_limit"], 512u64 << 20);
    let d = &g["devices"][0];
    assert_eq!(d["dev"], 0);
    assert_eq!(d["state"], "Connected");
    assert_eq!(d["connected"], true);
    assert_eq!(d["display_buffers"], 2);
    assert_eq!(d["refusals"], 1);
    let last = &d["last_refusal"];
    assert_eq!(last["errno"], libc::ENOENT, "{text}");
    assert!(
        last["reason"].as_str().unwrap().contains("0xdead"),
        "{text}"
    );
    let c = &d["connectors"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["unique_id"], "Virtual-1");
    assert_eq!(c["width"], 64);
    assert_eq!(c["height"], 48);
    assert_eq!(c["target"], "headless");
    assert_eq!(c["path"], "copy");
    assert_eq!(c["flips"], 30, "{text}");
    let rate = c["flips_per_sec"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 100.0, "flips_per_sec {rate}");

    let text = status_cli(&socket, false);
    assert!(
        text.contains("dom5: 24.0 KiB of 512.0 MiB mapped"),
        "{text}"
    );
    assert!(
        text.contains("connector 0 Virtual-1 64x48 -> headless, copy, 30 flips"),
        "{text}"
    );
    assert!(text.contains("1 refused"), "{text}");

    // Nothing but `status`; errors say so and change nothing.
    assert!(ask(&socket, b"stop\n").starts_with("error: unknown request"));
    let long = vec![b'x'; 4096];
    assert!(ask(&socket, &long).starts_with("error: request longer than"));

    rig.stop_backend();
    assert!(!socket.exists(), "control socket left behind");
}

#[test]
fn a_silent_client_never_stalls_the_loop() {
    let dir = TempDir::new("control-slow");
    let socket = dir.path().join("control");
    let mut rig = Rig::unstarted(ServerConfig {
        control_socket: Some(socket.clone()),
        ..ServerConfig::default()
    });
    rig.start();
    let mut fe = rig.guest(5, &[("Virtual-1", 64, 48)]);
    // Connects, sends half a line, then nothing; another never writes at all.
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(b"sta").unwrap();
    let mut silent = UnixStream::connect(&socket).unwrap();
    let t0 = Instant::now();
    // The guest is served and other clients are answered meanwhile.
    show_and_flip(&rig, &mut fe, 5, 0, (64, 48), 10);
    assert!(ask(&socket, b"status\n").contains("dom5"));
    // Both are dropped after about a second of idleness.
    for s in [&mut half, &mut silent] {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "not closed");
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "idle clients dropped after {waited:?}"
    );
}

#[test]
fn status_without_a_server_says_so() {
    let dir = TempDir::new("control-none");
    let out = Command::new(env!("CARGO_BIN_EXE_displback"))
        .args(["status", "--socket"])
        .arg(dir.path().join("control"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is `displback serve` running"), "{stderr}");
}
