//! Deterministic random requests (a cheap, always-on fuzz run; `fuzz/` has the
//! coverage-guided target): the request handler never panics, never leaks a mapping,
//! and answers every request with 0 or a negative errno.

use std::sync::Arc;

use displback::displif::connection::{Connection, ConnectorCfg, Limits};
use displback::displif::format::PixelFormat;
use displback::displif::request::{decode, Request};
use displback::output::headless::Headless;
use displback::output::Output;
use displback::sim::SimXen;
use displback::xen::platform::GrantMapper;
use displback::xen::DomId;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Mostly one of the interesting values, sometimes anything at all.
    fn u32(&mut self, interesting: &[u32]) -> u32 {
        match self.next() % 10 {
            0 => self.next() as u32,
            1 => 0,
            _ => interesting[(self.next() % interesting.len() as u64) as usize],
        }
    }
}

#[test]
fn random_requests_never_panic_or_leak() {
    let sim = SimXen::new();
    let guest = DomId(3);
    let mem = sim.guest_mem(guest);
    // Real granted pages the random requests can hit: 8 data pages and a directory.
    let data = mem.alloc(8).unwrap();
    let data_refs = mem.grant(&data, DomId(0), false);
    let dir = mem.alloc(1).unwrap();
    let dir_ref = mem.grant(&dir, DomId(0), false)[0];
    let mut page = vec![0u8; 4096];
    for (i, r) in data_refs.iter().enumerate() {
        page[4 + i * 4..8 + i * 4].copy_from_slice(&r.0.to_ne_bytes());
    }
    dir.region().write(0, &page).unwrap();

    let mapper = sim.grant_mapper(DomId(0));
    let grants: Arc<dyn GrantMapper> = mapper.clone();
    let cfgs = vec![
        ConnectorCfg {
            unique_id: "Virtual-1".into(),
            width: 64,
            height: 32,
        },
        ConnectorCfg {
            unique_id: "Virtual-2".into(),
            width: 16,
            height: 16,
        },
    ];
    let mut out = Headless::new();
    let mut conn = Connection::new(
        guest,
        0,
        cfgs,
        grants,
        Some(sim.gntalloc(DomId(0))),
        Limits::default(),
    );
    let fourccs: Vec<u32> = PixelFormat::ALL.iter().map(|f| f.fourcc()).collect();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut ok = 0;
    for _ in 0..200_000 {
        let cookie = |r: &mut Rng| 1 + r.next() % 4;
        let dims = [8, 16, 32, 64, 4096];
        let op = rng.next() % 9;
        let request = match op {
            0 | 1 => Request::DbufCreate {
                dbuf_cookie: cookie(&mut rng),
                width: rng.u32(&dims),
                height: rng.u32(&dims),
                bpp: rng.u32(&[16, 24, 32]),
                buffer_sz: rng.u32(&[4096, 8192, 8 * 4096, 32768]),
                flags: rng.u32(&[0, 0, 0, 1]),
                gref_directory: rng.u32(&[dir_ref.0, dir_ref.0, data_refs[1].0]),
                data_ofs: rng.u32(&[0, 0, 0, 64]),
            },
            2 => Request::DbufDestroy {
                dbuf_cookie: cookie(&mut rng),
            },
            3 | 4 => Request::FbAttach {
                dbuf_cookie: cookie(&mut rng),
                fb_cookie: cookie(&mut rng),
                width: rng.u32(&dims),
                height: rng.u32(&dims),
                pixel_format: rng.u32(&fourccs),
            },
            5 => Request::FbDetach {
                fb_cookie: cookie(&mut rng),
            },
            6 => Request::SetConfig {
                fb_cookie: cookie(&mut rng),
                x: rng.u32(&[0, 0, 1]),
                y: rng.u32(&[0, 0, 1]),
                width: rng.u32(&dims),
                height: rng.u32(&dims),
                bpp: rng.u32(&[16, 24, 32]),
            },
            7 => Request::PgFlip {
                fb_cookie: cookie(&mut rng),
            },
            _ => Request::GetEdid {
                buffer_sz: rng.u32(&[4096, 32768, 16]),
                gref_directory: rng.u32(&[dir_ref.0]),
            },
        };
        let mut slot = request.encode(rng.next() as u16);
        // Sometimes raw garbage in the payload, too.
        if rng.next() % 8 == 0 {
            let at = 8 + (rng.next() % 56) as usize;
            slot[at] = rng.next() as u8;
        }
        let env = decode(&slot);
        let which = (rng.next() % 2) as u32;
        let reply = conn.handle(which, env.request, &mut out);
        assert!(reply.status <= 0);
        if reply.status == 0 {
            ok += 1;
        }
        let mut done = Vec::new();
        out.dispatch(
            std::time::Instant::now() + std::time::Duration::from_secs(1),
            &mut done,
        );
    }
    eprintln!("random requests: {ok} succeeded");
    assert!(
        ok > 1000,
        "only {ok} requests succeeded: the generator is too hostile to reach deep states"
    );
    conn.close(&mut out);
    assert_eq!(mapper.mapped_pages(), 0, "mappings leaked");
}
