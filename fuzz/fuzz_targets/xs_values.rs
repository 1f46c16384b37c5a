//! Fuzz every parser of guest-controlled XenStore values: connector resolutions
//! (`WxH`), connector unique-ids, XenbusState `state` nodes, u32 nodes (ring refs, event
//! channels), and the XenStore wire client's parsing of replies and watch events.
//!
//! The value parsers get the bytes the way the backend sees them: `XsClient::read`
//! hands out `String::from_utf8_lossy` of the payload with trailing NULs stripped.
//! The wire client has no pure parsing function (its framing is private to
//! `XsClient`), so it is driven through a socketpair: the fuzz bytes are the daemon's
//! side of the stream, written up front and followed by EOF, so no call can block.
//!
//! Run: `cargo +nightly fuzz run xs_values` in fuzz/.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use displback::displif::device::{parse_resolution, parse_u32, valid_unique_id, MAX_DIMENSION};
use displback::xen::xenstore::wire::{self, Header, HEADER_LEN, PAYLOAD_MAX};
use displback::xen::xenstore::{Tx, XsClient, XsError};
use displback::xen::XenbusState;
use libfuzzer_sys::fuzz_target;

/// Reference for `parse_u32`: trailing NULs ignored, then 1..=10 ASCII digits that fit.
fn ref_u32(s: &str) -> Option<u32> {
    let t = s.trim_end_matches('\0');
    if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    u32::try_from(v).ok()
}

fn check_values(s: &str) {
    // u32 nodes.
    let u = parse_u32(s);
    assert_eq!(u, ref_u32(s), "parse_u32({s:?})");
    if let Some(v) = u {
        assert_eq!(parse_u32(&v.to_string()), Some(v));
    }

    // Resolutions: both dimensions in 1..=MAX_DIMENSION, and exactly what the two
    // halves around the first 'x' say.
    match parse_resolution(s) {
        Some((w, h)) => {
            assert!((1..=8192).contains(&w), "width {w} from {s:?}");
            assert!((1..=8192).contains(&h), "height {h} from {s:?}");
            let (ws, hs) = s.split_once('x').expect("parsed, so it has an x");
            assert_eq!(ref_u32(ws), Some(w), "{s:?}");
            assert_eq!(ref_u32(hs), Some(h), "{s:?}");
            assert_eq!(parse_resolution(&format!("{w}x{h}")), Some((w, h)));
        }
        None => {
            if let Some((ws, hs)) = s.split_once('x') {
                let ok = |v: Option<u32>| v.is_some_and(|v| (1..=MAX_DIMENSION).contains(&v));
                assert!(!(ok(ref_u32(ws)) && ok(ref_u32(hs))), "{s:?} refused");
            }
        }
    }

    // Unique ids: non-empty, <= 64 bytes of [A-Za-z0-9-_.:], and nothing else.
    let valid = valid_unique_id(s);
    let want = !s.is_empty()
        && s.len() <= 64
        && s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    assert_eq!(valid, want, "valid_unique_id({s:?})");
    if valid {
        assert!(s.len() <= 64 && s.is_ascii() && !s.contains(['/', ' ', '\0', ',', '\n']));
    }

    // XenbusState: anything unparsable is Unknown; known states round-trip.
    let st = XenbusState::parse(s);
    assert_eq!(XenbusState::parse(st.as_str()), st);
    let n = s.trim().parse::<u8>().ok();
    match n {
        Some(v @ 1..=8) => assert_eq!(st as u8, v, "{s:?}"),
        _ => assert_eq!(st, XenbusState::Unknown, "{s:?}"),
    }
}

/// Build a daemon stream from framed fuzz records: `[ty][req_id sel][len] payload`.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut d = data;
    while d.len() >= 3 {
        let ty = u32::from(d[0] % 18);
        // Small selectors are the ids a fresh client uses (0 = "synthesized" reply).
        let req_id = match d[1] {
            s @ 0..=7 => u32::from(s),
            s => u32::from(s) << 8,
        };
        let len = usize::from(d[2]).min(d.len() - 3);
        let msg = wire::encode_msg(ty, req_id, 0, &d[3..3 + len]).expect("small payload");
        out.extend_from_slice(&msg);
        d = &d[3 + len..];
    }
    out
}

fn check_events(evs: &[displback::xen::xenstore::WatchEvent]) {
    for e in evs {
        assert!(!e.path.is_empty());
        assert!(!e.path.contains('\0') && !e.token.contains('\0'), "{e:?}");
    }
}

fn check_client(op: u8, stream: &[u8]) {
    // Header framing round-trips.
    if let Some(h) = Header::decode(stream) {
        assert_eq!(h.encode()[..], stream[..HEADER_LEN]);
        assert_eq!(Header::decode(&h.encode()), Some(h));
    } else {
        assert!(stream.len() < HEADER_LEN);
    }

    let (a, mut daemon) = UnixStream::pair().expect("socketpair");
    let mut c = XsClient::from_stream(a).expect("client");
    // Far below the socket buffer, so this never blocks; then EOF.
    daemon.write_all(stream).expect("write stream");
    daemon.shutdown(Shutdown::Write).expect("shutdown");

    match op % 9 {
        0 => {
            if let Ok(evs) = c.take_watch_events() {
                check_events(&evs);
            }
        }
        1 => {
            if let Ok(Some(v)) = c.read(Tx::NONE, "/local/domain/1/device/vdispl/0/state") {
                assert!(!v.ends_with('\0'), "{v:?}");
                // The value then goes to the value parsers, as in the backend.
                check_values(&v);
            }
        }
        2 => {
            if let Ok(list) = c.directory(Tx::NONE, "/local/domain/0/backend/vdispl") {
                for s in &list {
                    assert!(!s.is_empty() && !s.contains('\0'), "{s:?}");
                }
            }
        }
        3 => {
            if let Ok(tx) = c.transaction_start() {
                assert_ne!(tx, Tx::NONE);
            }
        }
        4 => {
            if let Ok(p) = c.get_domain_path(1) {
                assert!(!p.ends_with('\0'));
            }
        }
        5 => {
            let _ = c.own_domid();
        }
        6 => {
            let _ = c.watch("/local/domain/0/backend/vdispl", "be");
        }
        7 => {
            let _ = c.transaction(|c, tx| {
                c.write(tx, "/local/domain/0/backend/vdispl/1/0/state", "4")?;
                c.read(tx, "/local/domain/1/device/vdispl/0/state")
            });
        }
        _ => {
            // Several requests in a row on the same stream.
            let _ = c.write(Tx::NONE, "/a", "b");
            let _ = c.rm(Tx::NONE, "/a");
            let _ = c.mkdir(Tx::NONE, "/a");
            let _ = c.set_perms(Tx::NONE, "/a", &["n0", "r1"]);
            let _ = c.unwatch("/a", "t");
            let _ = c.transaction_end(Tx(1), true);
        }
    }
    // Whatever happened, watch events collected so far are well formed, and the
    // client never blocks (the stream is at EOF).
    match c.take_watch_events() {
        Ok(evs) => check_events(&evs),
        Err(XsError::Io(_) | XsError::Protocol(_)) => {}
        Err(e) => panic!("take_watch_events: {e:?}"),
    }
    drop(daemon);
}

fuzz_target!(|data: &[u8]| {
    // Values as XsClient::read hands them out, and with the NULs left in.
    let lossy = String::from_utf8_lossy(data);
    check_values(&lossy);
    check_values(lossy.trim_end_matches('\0'));

    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(16 * (HEADER_LEN + PAYLOAD_MAX))];
    if op & 0x80 != 0 {
        check_client(op, &framed(rest));
    } else {
        check_client(op, rest);
    }
});
