//! Harness helper (DomU of the `xen-input` scenario): opens the input devices
//! xen-kbdfront made, prints `INPUT-DEV` for each and `INPUT-READY` once the keyboard and
//! the multi-touch device exist, then what arrives as key=value lines:
//! `INPUT-KEY dev=kbd|ptr code=N value=0|1` (autorepeat left out) and, at each
//! multi-touch SYN_REPORT, `INPUT-MT-FRAME contacts=SLOT:X,Y;...` (the contacts down and
//! where; empty when none). Stops with `INPUT-DONE` when F12 is released, or after
//! `--timeout` seconds (`INPUT-TIMEOUT`, exit 1).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use displback::input::evdev::Evdev;
use displback::input::translate::*;

const KEY_F12: u16 = 88;

struct Dev {
    ev: Evdev,
    label: &'static str,
    slot: usize,
    /// slot -> (down, x, y)
    mt: BTreeMap<usize, (bool, i32, i32)>,
}

fn label(name: &str) -> &'static str {
    if name.contains("Keyboard") {
        "kbd"
    } else if name.contains("Multi") {
        "mt"
    } else if name.contains("Pointer") {
        "ptr"
    } else {
        "other"
    }
}

fn main() {
    let timeout: u64 = std::env::args()
        .skip_while(|a| a != "--timeout")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut devs: BTreeMap<PathBuf, Dev> = BTreeMap::new();
    let mut ready = false;
    let mut raw = Vec::new();
    while Instant::now() < deadline {
        if !ready {
            if let Ok(rd) = std::fs::read_dir("/dev/input") {
                let mut paths: Vec<PathBuf> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
                paths.sort();
                for p in paths {
                    let is_event = p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("event"));
                    if !is_event || devs.contains_key(&p) {
                        continue;
                    }
                    let Ok(ev) = Evdev::open(&p) else { continue };
                    let name = ev.name().unwrap_or_default();
                    let l = label(&name);
                    let mut info = String::new();
                    for (axis, tag) in [
                        (ABS_X, "abs_x_max"),
                        (ABS_MT_POSITION_X, "mt_x_max"),
                        (ABS_MT_POSITION_Y, "mt_y_max"),
                        (ABS_MT_SLOT, "mt_slot_max"),
                    ] {
                        if ev.has_abs(axis) {
                            if let Ok(a) = ev.abs_info(axis) {
                                info.push_str(&format!(" {tag}={}", a.maximum));
                            }
                        }
                    }
                    println!(
                        "INPUT-DEV path={} dev={l} name=\"{name}\"{info}",
                        p.display()
                    );
                    devs.insert(
                        p,
                        Dev {
                            ev,
                            label: l,
                            slot: 0,
                            mt: BTreeMap::new(),
                        },
                    );
                }
            }
            let has = |l| devs.values().any(|d| d.label == l);
            if has("kbd") && has("mt") {
                ready = true;
                println!("INPUT-READY devices={}", devs.len());
            }
        }
        for d in devs.values_mut() {
            raw.clear();
            let mut partial = 0;
            let _ = d.ev.read_events(&mut raw, &mut partial);
            for e in &raw {
                match (e.ty, e.code) {
                    (EV_KEY, code) if d.label != "mt" && e.value != 2 => {
                        println!("INPUT-KEY dev={} code={code} value={}", d.label, e.value);
                        if code == KEY_F12 && e.value == 0 {
                            println!("INPUT-DONE");
                            return;
                        }
                    }
                    (EV_ABS, ABS_MT_SLOT) if d.label == "mt" => d.slot = e.value.max(0) as usize,
                    (EV_ABS, ABS_MT_TRACKING_ID) if d.label == "mt" => {
                        d.mt.entry(d.slot).or_insert((false, 0, 0)).0 = e.value >= 0;
                    }
                    (EV_ABS, ABS_MT_POSITION_X) if d.label == "mt" => {
                        d.mt.entry(d.slot).or_insert((false, 0, 0)).1 = e.value
                    }
                    (EV_ABS, ABS_MT_POSITION_Y) if d.label == "mt" => {
                        d.mt.entry(d.slot).or_insert((false, 0, 0)).2 = e.value
                    }
                    (EV_SYN, SYN_REPORT) if d.label == "mt" => {
                        let c: Vec<String> =
                            d.mt.iter()
                                .filter(|(_, (down, _, _))| *down)
                                .map(|(s, (_, x, y))| format!("{s}:{x},{y}"))
                                .collect();
                        println!("INPUT-MT-FRAME contacts={}", c.join(";"));
                    }
                    _ => {}
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("INPUT-TIMEOUT ready={ready}");
    std::process::exit(1);
}
