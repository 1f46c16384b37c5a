//! evdev input sources end to end on the simulated Xen: a device node that appears after
//! the backend started (hot-plug through inotify), its events translated and delivered to
//! the guest device named by `unique-id`, malformed bytes skipped, and the device
//! vanishing with a key held down releases it in the guest.
//!
//! The "device" is a FIFO (no uinput here): reads behave like an evdev node's; the
//! evdev ioctls fail on it, so it is taken as a keyboard (no absolute axes).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Rig, BACKEND, WAIT};
use displback::input::evdev::RawEvent;
use displback::input::source::{InputSourceCfg, Sources};
use displback::input::translate::{EV_KEY, EV_SYN, SYN_REPORT};
use displback::kbdif::wire::InEvent;
use displback::sim::kbdfront::{KbdFrontOptions, KbdFrontSim};
use displback::xen::xenstore::XsClient;
use displback::xen::DomId;
use zerocopy::IntoBytes;

#[test]
fn hot_plugged_device_feeds_its_guest_and_releases_on_vanish() {
    let mut rig = Rig::new();
    rig.toolstack.create_domain(DomId(5), "guest5").unwrap();
    rig.toolstack
        .add_vkbd(BACKEND, DomId(5), 0, &[("unique-id", "K:1")])
        .unwrap();
    let xs = XsClient::from_stream(rig.xenstored.connect(5).unwrap()).unwrap();
    let mut fe = KbdFrontSim::new(&rig.sim, xs, DomId(5), 0, KbdFrontOptions::default()).unwrap();
    fe.wait_connected(WAIT).unwrap();

    let dir = std::env::temp_dir().join(format!("displback-sources-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = dir.join("event0");
    let cfg = InputSourceCfg {
        unique_id: "K:1".into(),
        device: Some(node.clone()),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread = Sources::new(&dir, vec![cfg], rig.input.clone().unwrap())
        .spawn(stop.clone())
        .unwrap();
    // Plugged in after the sources started.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let status = std::process::Command::new("mkfifo")
        .arg(&node)
        .status()
        .unwrap();
    assert!(status.success());
    // Blocks until the sources opened the node for reading.
    let mut w = std::fs::OpenOptions::new().write(true).open(&node).unwrap();
    let evs = [
        RawEvent::new(EV_KEY, 42, 1),
        RawEvent::new(EV_SYN, SYN_REPORT, 0),
        RawEvent::new(EV_KEY, 30, 1),
        RawEvent::new(EV_KEY, 30, 2),
        RawEvent::new(EV_SYN, SYN_REPORT, 0),
        RawEvent::new(EV_KEY, 30, 0),
        RawEvent::new(EV_SYN, SYN_REPORT, 0),
    ];
    for e in &evs {
        w.write_all(e.as_bytes()).unwrap();
    }
    let key = |keycode, pressed| InEvent::Key { pressed, keycode };
    assert_eq!(
        fe.wait_events(3, WAIT).unwrap(),
        vec![key(42, true), key(30, true), key(30, false)]
    );
    // A torn record, then the device goes away with Shift still down.
    w.write_all(&[1, 2, 3]).unwrap();
    drop(w);
    assert_eq!(fe.wait_events(1, WAIT).unwrap(), vec![key(42, false)]);
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
