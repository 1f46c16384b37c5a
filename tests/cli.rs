//! The `displback` command line: logs that fit their sink (a pipe gets no colours, `--log-format
//! json` gets JSON lines, the journal gets `<N>` priority prefixes).

mod common;

use common::TempDir;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

/// `displback --log info <global> demo` with a small, fast demo writing into a fresh directory;
/// the environment variables that would change the log format are cleared.
fn demo(global: &[&str], dir: &TempDir) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_displback"));
    cmd.args(["--log", "info"])
        .args(global)
        .args(["demo", "--output", "headless", "--connectors", "1"])
        .args(["--frames", "5", "--resolution", "320x200", "--out"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR");
    cmd
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{stderr}");
    stderr
}

#[test]
fn piped_stderr_gets_plain_text() {
    let dir = TempDir::new("cli");
    let stderr = run(demo(&[], &dir));
    assert!(!stderr.trim().is_empty(), "no log output at --log info");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes in logs written to a pipe:\n{stderr:?}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with('<')),
        "journal prefixes without JOURNAL_STREAM:\n{stderr}"
    );
    assert!(dir.path().join("conn0.png").is_file());
}

#[test]
fn json_format_writes_one_object_per_line() {
    let dir = TempDir::new("cli");
    let stderr = run(demo(&["--log-format", "json"], &dir));
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output at --log info");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nall of stderr:\n{stderr}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(obj.get("level").is_some_and(|l| l.is_string()), "{line}");
        assert!(obj.get("fields").is_some_and(|f| f.is_object()), "{line}");
    }
}

/// Runs the demo with stderr on a stream socket (what systemd gives a service whose output
/// goes to the journal), JOURNAL_STREAM set to `journal_stream(dev, ino of that socket)`.
/// Returns what arrived on the socket.
fn demo_on_stream(extra: &[&str], journal_stream: impl Fn(u64, u64) -> String) -> String {
    let dir = TempDir::new("cli");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let meta = std::fs::File::from(std::os::fd::OwnedFd::from(theirs.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let mut cmd = demo(extra, &dir);
    cmd.env("JOURNAL_STREAM", journal_stream(meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the child's end: the read below ends when the child exits
    let mut stderr = String::new();
    (&ours).read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo failed:\n{stderr}");
    stderr
}

#[test]
fn journal_stream_on_stderr_gets_priority_prefixes() {
    let stderr = demo_on_stream(&[], |dev, ino| format!("{dev}:{ino}"));
    assert!(!stderr.trim().is_empty(), "no log output at --log info");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    for line in stderr.lines() {
        // The demo logs at info and nothing else at --log info; warnings would be <4>.
        assert!(
            line.starts_with("<6>") || line.starts_with("<4>") || line.starts_with("<3>"),
            "line without a journal priority prefix: {line:?}\nall of stderr:\n{stderr}"
        );
        // journald stamps entries itself; ours would start with a year.
        assert!(!line[3..].starts_with("20"), "timestamp in {line:?}");
    }
    assert!(stderr.lines().any(|l| l.starts_with("<6>")), "{stderr}");
}

#[test]
fn journal_stream_naming_another_file_is_ignored() {
    // stderr was redirected after systemd set JOURNAL_STREAM: plain text again.
    let stderr = demo_on_stream(&[], |dev, ino| format!("{dev}:{}", ino + 1));
    assert!(!stderr.trim().is_empty(), "no log output at --log info");
    assert!(
        !stderr.lines().any(|l| l.starts_with('<')),
        "journal prefixes for a JOURNAL_STREAM that is not stderr:\n{stderr}"
    );
}

#[test]
fn log_file_is_plain_text_even_under_the_journal() {
    let dir = TempDir::new("cli");
    let log = dir.path().join("displback.log");
    let log_arg = log.to_str().unwrap().to_owned();
    let stderr = demo_on_stream(&["--log-file", &log_arg], |dev, ino| format!("{dev}:{ino}"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.trim().is_empty(),
        "nothing in --log-file; stderr:\n{stderr}"
    );
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(!text.lines().any(|l| l.starts_with('<')), "{text}");
}
