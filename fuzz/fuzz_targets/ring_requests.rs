//! Fuzz the ring consumer and the request handler from raw bytes: the bytes are the
//! ring page a hostile frontend wrote (indices and slots), followed by data pages.
//! Run: `cargo install cargo-fuzz && cargo +nightly fuzz run ring_requests` in fuzz/.
#![no_main]

use displback::xen::platform::GrantMapper;
use displback::xen::DomId;
use displback::displif::connection::{ConnectorCfg, Connection, Limits};
use displback::displif::ring::BackRing;
use displback::displif::turn::{serve_turn, REQUESTS_PER_TURN};
use displback::output::headless::Headless;
use displback::sim::SimXen;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sim = SimXen::new();
    let guest = DomId(1);
    let mem = sim.guest_mem(guest);
    let pages = mem.alloc(4).unwrap();
    let n = data.len().min(4 * 4096);
    pages.region().write(0, &data[..n]).unwrap();
    let refs = mem.grant(&pages, DomId(0), false);
    let mapper = sim.grant_mapper(DomId(0));
    let mut ring = BackRing::new(mapper.map(guest, &refs[..1], true).unwrap());
    let cfg = ConnectorCfg { unique_id: "Virtual-1".into(), width: 64, height: 64 };
    let mut out = Headless::new();
    let mut conn = Connection::new(guest, 0, vec![cfg], mapper.clone(), None, Limits::default());
    // The event loop's own turn function: a hostile ring may cost at most its turns.
    for _ in 0..8 {
        let mut statuses = Vec::new();
        match serve_turn(&mut ring, &mut conn, 0, &mut out, |_, status| statuses.push(status)) {
            Ok(turn) => {
                assert!(statuses.iter().all(|&s| s <= 0));
                assert!(statuses.len() <= REQUESTS_PER_TURN);
                if let Some(d) = turn.deferred {
                    let _ = d.release.wait();
                    break;
                }
                if !turn.more || turn.misbehaving {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ring.push_responses();
    conn.close(&mut out);
    drop(ring);
    assert_eq!(mapper.mapped_pages(), 0);
});
