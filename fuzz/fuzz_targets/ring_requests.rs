//! Fuzz the ring consumer and the request handler from raw bytes: the bytes are the
//! ring page a hostile frontend wrote (indices and slots), followed by data pages.
//! Run: `cargo install cargo-fuzz && cargo +nightly fuzz run ring_requests` in fuzz/.
#![no_main]

use displback::backend::xen::GrantMapper;
use displback::backend::DomId;
use displback::displif::connection::{ConnectorCfg, Connection, Limits};
use displback::displif::request::{decode, encode_response};
use displback::displif::ring::BackRing;
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
    for _ in 0..64 {
        match ring.next_request() {
            Ok(Some(slot)) => {
                let env = decode(&slot);
                let reply = conn.handle(0, env.request, &mut out);
                assert!(reply.status <= 0);
                ring.put_response(&encode_response(env.id, env.operation, reply.status, reply.edid_sz));
            }
            Ok(None) | Err(_) => break,
        }
    }
    ring.push_responses();
    conn.close(&mut out);
    drop(ring);
    assert_eq!(mapper.mapped_pages(), 0);
});
