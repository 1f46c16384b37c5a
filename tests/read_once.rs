//! Every request is copied out of shared memory exactly once, and only the copy is used:
//! a hostile guest thread rewrites the ring slots as fast as it can while the backend
//! consumes them, and the backend neither crashes nor reads a slot twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use displback::displif::connection::{Connection, ConnectorCfg, Limits};
use displback::displif::request::Request;
use displback::displif::ring::{BackRing, FrontRing};
use displback::displif::turn::serve_turn;
use displback::displif::wire;
use displback::output::headless::Headless;
use displback::sim::SimXen;
use displback::xen::platform::GrantMapper;
use displback::xen::DomId;

const BACKEND: DomId = DomId(0);
const GUEST: DomId = DomId(1);

#[test]
fn each_request_is_copied_once_while_the_guest_rewrites_it() {
    let sim = SimXen::new();
    let guest = sim.guest_mem(GUEST);
    let page = guest.alloc(1).unwrap();
    let refs = guest.grant(&page, BACKEND, false);
    let mapper = sim.grant_mapper(BACKEND);
    // The frontend's view and the backend's view of the same ring page.
    let mut front = FrontRing::init(mapper.map(GUEST, &refs, true).unwrap());
    let back_page = mapper.map(GUEST, &refs, true).unwrap();
    let mut back = BackRing::new(back_page);
    let mut out = Headless::new();
    let cfg = ConnectorCfg {
        unique_id: "Virtual-1".into(),
        width: 64,
        height: 64,
    };
    // Thousands of refusals a second are the point here: no closing for them.
    let limits = Limits {
        max_refusals_per_sec: u32::MAX,
        ..Limits::default()
    };
    let mut conn = Connection::new(GUEST, 0, vec![cfg], mapper.clone(), None, limits);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(std::sync::Barrier::new(2));
    let hostile = {
        let stop = stop.clone();
        let started = started.clone();
        let scribbler = mapper.map(GUEST, &refs, true).unwrap();
        thread::spawn(move || {
            // Alternate every slot between two different requests and random bytes.
            let a = Request::FbDetach { fb_cookie: 7 }.encode(1);
            let b = Request::DbufCreate {
                dbuf_cookie: 0,
                width: u32::MAX,
                height: u32::MAX,
                bpp: 33,
                buffer_sz: u32::MAX,
                flags: 0xff,
                gref_directory: 0,
                data_ofs: u32::MAX,
            }
            .encode(2);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut n = 0u64;
            started.wait();
            while !stop.load(Ordering::Relaxed) {
                for slot in 0..32usize {
                    let off = wire::ring::SLOTS + slot * wire::SLOT_SIZE;
                    match n % 3 {
                        0 => scribbler.write(off, &a).unwrap(),
                        1 => scribbler.write(off, &b).unwrap(),
                        _ => {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            scribbler.write(off, &x.to_ne_bytes()).unwrap();
                        }
                    }
                    n += 1;
                }
            }
            n
        })
    };

    started.wait();
    let mut handled = 0u64;
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..2000u32 {
        for i in 0..8u32 {
            front.put_request(
                &Request::FbDetach {
                    fb_cookie: u64::from(round * 8 + i + 100),
                }
                .encode(0),
            );
        }
        front.push_requests();
        let before = back_copies(&back);
        let mut got = 0;
        // The event loop's turn function, as many turns as the time share needs.
        loop {
            let turn = serve_turn(&mut back, &mut conn, 0, &mut out, |_, status| {
                *statuses.entry(status).or_insert(0u32) += 1;
                got += 1;
            })
            .unwrap();
            assert!(turn.deferred.is_none() && !turn.misbehaving);
            if !turn.more {
                break;
            }
        }
        while front.next_response().is_some() {}
        assert_eq!(got, 8);
        // Exactly one copy out of the ring page per request; index loads are atomics.
        assert_eq!(
            back_copies(&back) - before,
            8,
            "a request slot was read more than once"
        );
        handled += got;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = hostile.join().unwrap();
    assert_eq!(handled, 16000);
    assert!(
        writes > 1000,
        "the hostile thread barely ran ({writes} writes)"
    );
    // Whatever the copies held, every answer is a refusal (no such fb, bad geometry, ...)
    // or an unknown op: nothing was created from a torn read.
    assert_eq!(conn.counts(), (0, 0));
    assert!(!statuses.contains_key(&0), "statuses: {statuses:?}");
}

fn back_copies(back: &BackRing) -> u64 {
    back.page().copies_out()
}
