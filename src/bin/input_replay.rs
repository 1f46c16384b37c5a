//! Harness helper (Dom0 of the `xen-input` scenario): creates a uinput keyboard and a
//! 10-contact touchscreen (0..=4095 on both axes), waits for displback to pick them up,
//! and replays a fixed script: keys with modifiers, a two-finger gesture, a contact at
//! the corners, then F12 (the guest's reader stops on it). Prints `REPLAY ...` lines.
//! lib/xen.py computes what the guest must see from the same script.

use std::thread::sleep;
use std::time::Duration;

use displback::input::evdev::{AbsInfo, RawEvent};
use displback::input::translate::*;
use displback::input::uinput::{Spec, UinputDevice, INPUT_PROP_DIRECT};

const KEY_LEFTCTRL: u16 = 29;
const KEY_LEFTSHIFT: u16 = 42;
const KEY_A: u16 = 30;
const KEY_C: u16 = 46;
const KEY_F12: u16 = 88;
const BTN_TOUCH: u16 = 0x14a;

fn syn() -> RawEvent {
    RawEvent::new(EV_SYN, SYN_REPORT, 0)
}

fn key(code: u16, v: i32) -> Vec<RawEvent> {
    vec![RawEvent::new(EV_KEY, code, v), syn()]
}

/// One touchscreen frame: (slot, Some((x, y)) = down/moved, None = lifted).
fn frame(
    contacts: &[(i32, Option<(i32, i32)>)],
    ids: &mut [i32; 10],
    next: &mut i32,
) -> Vec<RawEvent> {
    let mut v = Vec::new();
    for &(slot, pos) in contacts {
        v.push(RawEvent::new(EV_ABS, ABS_MT_SLOT, slot));
        let s = slot as usize;
        match pos {
            Some((x, y)) => {
                if ids[s] < 0 {
                    ids[s] = *next;
                    *next += 1;
                    v.push(RawEvent::new(EV_ABS, ABS_MT_TRACKING_ID, ids[s]));
                }
                v.push(RawEvent::new(EV_ABS, ABS_MT_POSITION_X, x));
                v.push(RawEvent::new(EV_ABS, ABS_MT_POSITION_Y, y));
            }
            None => {
                ids[s] = -1;
                v.push(RawEvent::new(EV_ABS, ABS_MT_TRACKING_ID, -1));
            }
        }
    }
    let down = ids.iter().any(|i| *i >= 0);
    v.push(RawEvent::new(EV_KEY, BTN_TOUCH, i32::from(down)));
    v.push(syn());
    v
}

fn main() {
    let settle_ms: u64 = std::env::args()
        .skip_while(|a| a != "--settle-ms")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let range = |max| AbsInfo {
        maximum: max,
        ..AbsInfo::default()
    };
    let kbd = UinputDevice::create(&Spec {
        name: "displback-replay-kbd".into(),
        keys: (1..=127).collect(),
        ..Spec::default()
    });
    let touch = UinputDevice::create(&Spec {
        name: "displback-replay-touch".into(),
        keys: vec![BTN_TOUCH],
        abs: vec![
            (ABS_X, range(4095)),
            (ABS_Y, range(4095)),
            (ABS_MT_SLOT, range(9)),
            (ABS_MT_POSITION_X, range(4095)),
            (ABS_MT_POSITION_Y, range(4095)),
            (ABS_MT_TRACKING_ID, range(65535)),
        ],
        props: vec![INPUT_PROP_DIRECT],
    });
    let (mut kbd, mut touch) = match (kbd, touch) {
        (Ok(k), Ok(t)) => (k, t),
        (k, t) => {
            println!(
                "REPLAY ERROR creating uinput devices: kbd={:?} touch={:?}",
                k.err(),
                t.err()
            );
            std::process::exit(1);
        }
    };
    // --go-file: wait (60 s) until the harness saw displback open both devices.
    let go: Option<String> = std::env::args().skip_while(|a| a != "--go-file").nth(1);
    println!("REPLAY DEVICES created");
    if let Some(go) = go {
        let mut waited = 0;
        while !std::path::Path::new(&go).exists() && waited < 600 {
            sleep(Duration::from_millis(100));
            waited += 1;
        }
        println!("REPLAY GO found={}", std::path::Path::new(&go).exists());
    }
    sleep(Duration::from_millis(settle_ms));
    let pause = || sleep(Duration::from_millis(150));
    let mut n = 0usize;
    let mut run = |dev: &mut UinputDevice, evs: Vec<RawEvent>| {
        n += evs.len();
        if let Err(e) = dev.emit(&evs) {
            println!("REPLAY ERROR writing: {e}");
            std::process::exit(1);
        }
        pause();
    };
    // Shift+A, Ctrl+C.
    for (code, v) in [
        (KEY_LEFTSHIFT, 1),
        (KEY_A, 1),
        (KEY_A, 0),
        (KEY_LEFTSHIFT, 0),
        (KEY_LEFTCTRL, 1),
        (KEY_C, 1),
        (KEY_C, 0),
        (KEY_LEFTCTRL, 0),
    ] {
        run(&mut kbd, key(code, v));
    }
    let mut ids = [-1i32; 10];
    let mut next = 100;
    // Two fingers: down, move, lift.
    for f in [
        vec![(0, Some((0, 0))), (1, Some((4095, 4095)))],
        vec![(0, Some((2048, 1024))), (1, Some((1024, 2048)))],
        vec![(0, None), (1, None)],
        // One contact at the corners.
        vec![(3, Some((0, 4095)))],
        vec![(3, Some((4095, 0)))],
        vec![(3, None)],
    ] {
        let evs = frame(&f, &mut ids, &mut next);
        run(&mut touch, evs);
    }
    run(&mut kbd, key(KEY_F12, 1));
    run(&mut kbd, key(KEY_F12, 0));
    println!("REPLAY DONE events={n}");
    sleep(Duration::from_millis(1000));
}
