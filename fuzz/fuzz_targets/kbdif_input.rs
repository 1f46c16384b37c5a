//! Fuzz the vkbd input path against hostile parties on both sides:
//!
//! * the guest, through the in-event ring: any sequence of consumer-index writes (the
//!   one word of the shared page it controls) between batches of events we push. The
//!   producer must refuse exactly when the index is not within a ring behind ours, never
//!   write outside the slot area, publish exactly its private producer index, and count
//!   every event as sent or dropped;
//! * a broken evdev device of the backend domain, through the translator: any axis
//!   ranges and slot count, then any stream of events. Positions stay within
//!   `0..=NORM_MAX`, contacts name slots the device has (and at most `MAX_SLOTS`), a
//!   contact is lifted only after it touched down, and a vanished device ends with a
//!   release of everything.
//!
//! Run: `cargo +nightly fuzz run kbdif_input` in fuzz/.
#![no_main]

use std::collections::HashSet;

use displback::input::evdev::{AbsInfo, RawEvent};
use displback::input::translate::{Caps, Translator, MAX_SLOTS};
use displback::kbdif::device::{Input, NORM_MAX};
use displback::kbdif::ring::InProducer;
use displback::kbdif::wire::{EventSlot, EVENT_SIZE, IN_RING_LEN, IN_RING_OFFS};
use displback::xen::mem::{shared, MappedRegion};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const IN_CONS: usize = 0;
const IN_PROD: usize = 4;
const PAGE: usize = 4096;

/// Two mappings of one shared page: the producer's and the guest's view of it.
fn shared_page() -> (MappedRegion, MappedRegion) {
    use std::os::fd::AsFd;
    let path = format!("/dev/shm/displback-kbdif-fuzz-{}", std::process::id());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("shm file");
    let _ = std::fs::remove_file(&path);
    f.set_len(PAGE as u64).expect("size");
    (
        shared(f.as_fd(), PAGE).expect("map"),
        shared(f.as_fd(), PAGE).expect("map"),
    )
}

fn ring(u: &mut Unstructured<'_>) -> Result<()> {
    let (page, view) = shared_page();
    let start: u32 = u.arbitrary()?;
    page.store_u32(IN_CONS, start);
    // A canary outside the slot area (the page's tail), to see stray writes.
    let tail = IN_RING_OFFS + IN_RING_LEN as usize * EVENT_SIZE;
    page.fill(tail, PAGE - tail, 0xa5).expect("fill");
    let mut p = InProducer::new(page);
    assert_eq!(p.prod(), start, "starts where the consumer is");
    let mut cons = start;
    for _ in 0..u.int_in_range(0..=64)? {
        if u.arbitrary()? {
            // The guest moves its index: honestly (by up to what is pending) or anyhow.
            cons = if u.arbitrary()? {
                cons.wrapping_add(u.int_in_range(0..=p.prod().wrapping_sub(cons).min(IN_RING_LEN))?)
            } else {
                u.arbitrary()?
            };
            view.store_u32(IN_CONS, cons);
        }
        let n = u.int_in_range(0..=2 * IN_RING_LEN as usize)?;
        let events: Vec<EventSlot> = (0..n).map(|i| [i as u8; EVENT_SIZE]).collect();
        let before = p.prod();
        let used = before.wrapping_sub(cons);
        match p.push(&events) {
            Err(e) => {
                assert!(used > IN_RING_LEN, "refused a valid index: {e}");
                assert_eq!(p.prod(), before);
                // A broken ring is closed: nothing more is pushed on it.
                break;
            }
            Ok(pushed) => {
                assert!(used <= IN_RING_LEN, "accepted consumer {cons} producer {before}");
                assert_eq!(pushed.sent + pushed.dropped, n as u32);
                assert_eq!(pushed.sent, (n as u32).min(IN_RING_LEN - used));
                assert_eq!(p.prod(), before.wrapping_add(pushed.sent));
                if pushed.sent > 0 {
                    assert_eq!(view.load_u32(IN_PROD), p.prod(), "published index");
                }
            }
        }
        assert_eq!(view.load_u32(IN_CONS), cons, "the producer never writes in_cons");
        let mut rest = vec![0u8; PAGE - tail];
        view.read(tail, &mut rest).expect("read");
        assert!(rest.iter().all(|&b| b == 0xa5), "a write outside the slots");
    }
    Ok(())
}

fn axis(u: &mut Unstructured<'_>) -> Result<Option<AbsInfo>> {
    Ok(if u.arbitrary()? {
        Some(AbsInfo {
            value: u.arbitrary()?,
            minimum: u.arbitrary()?,
            maximum: u.arbitrary()?,
            fuzz: 0,
            flat: 0,
            resolution: 0,
        })
    } else {
        None
    })
}

fn translator(u: &mut Unstructured<'_>) -> Result<()> {
    let caps = Caps {
        abs_x: axis(u)?,
        abs_y: axis(u)?,
        mt_x: axis(u)?,
        mt_y: axis(u)?,
        mt_slots: u.int_in_range(0..=80)?,
    };
    let slots = caps.mt_slots.min(MAX_SLOTS);
    let mut t = Translator::new(caps);
    let mut out = Vec::new();
    let mut down: HashSet<u8> = HashSet::new();
    let check = |out: &mut Vec<Input>, down: &mut HashSet<u8>| {
        for i in out.drain(..) {
            match i {
                Input::Abs { x, y, .. } => assert!(x <= NORM_MAX && y <= NORM_MAX, "{i:?}"),
                Input::TouchDown { slot, x, y } => {
                    assert!((slot as usize) < slots, "{i:?} with {slots} slots");
                    assert!(x <= NORM_MAX && y <= NORM_MAX, "{i:?}");
                    assert!(down.insert(slot), "{i:?}: already down");
                }
                Input::TouchMove { slot, x, y } => {
                    assert!(down.contains(&slot), "{i:?}: not down");
                    assert!(x <= NORM_MAX && y <= NORM_MAX, "{i:?}");
                }
                Input::TouchUp { slot } => assert!(down.remove(&slot), "{i:?}: not down"),
                Input::ReleaseAll => down.clear(),
                Input::Key { .. } | Input::Motion { .. } | Input::TouchFrame => {}
            }
        }
    };
    while !u.is_empty() {
        let ev = RawEvent {
            sec: 0,
            usec: 0,
            ty: u.int_in_range(0..=4)?,
            code: if u.arbitrary()? { u.int_in_range(0..=0x3a)? } else { u.arbitrary()? },
            value: u.arbitrary()?,
        };
        t.feed(&ev, &mut out);
        check(&mut out, &mut down);
    }
    t.vanished(&mut out);
    assert!(
        out.iter().any(|i| *i == Input::ReleaseAll),
        "a vanished device releases everything: {out:?}"
    );
    check(&mut out, &mut down);
    assert!(down.is_empty());
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let which: bool = u.arbitrary().unwrap_or(false);
    let _ = if which { ring(&mut u) } else { translator(&mut u) };
});
