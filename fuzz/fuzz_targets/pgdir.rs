//! Fuzz the page-directory walk (`displif::pgdir`) against a hostile chain.
//!
//! The fuzz bytes build a few guest pages in the simulated Xen (each granted to Dom0
//! read-write, read-only, to another domain, or with access already ended), fill their
//! `gref_dir_next_page` and `gref[]` words, then ask `read_refs` for a fuzz-chosen
//! number of refs and `write_refs` to store fuzz refs. A small model of the walk says
//! what the answer must be; every mapping must be gone afterwards.
//!
//! Run: `cargo +nightly fuzz run pgdir` in fuzz/.
#![no_main]

use std::collections::{HashMap, HashSet};

use displback::xen::platform::GrantMapper;
use displback::xen::{DomId, GrantRef};
use displback::displif::pgdir::{pages_for, read_refs, write_refs};
use displback::sim::{SimPages, SimXen};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const GUEST: DomId = DomId(1);
const OTHER: DomId = DomId(7);
/// Refs per directory page (displif.h: 4-byte next ref, then 1023 refs).
const PER_PAGE: usize = 1023;
const NEXT: usize = 0;
const GREFS: usize = 4;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Access {
    Rw,
    Ro,
    /// Granted to another domain: Dom0 can't map it.
    Foreign,
    /// Access ended after granting: the ref no longer exists.
    Ended,
}

struct Page {
    gref: u32,
    access: Access,
    words: Vec<u32>,
}

/// What the walk must do, from the model's point of view.
fn model(
    pages: &HashMap<u32, &Page>,
    first: u32,
    count: usize,
    write: Option<&[u32]>,
) -> std::result::Result<Vec<u32>, &'static str> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut next = first;
    while out.len() < count {
        if next == 0 {
            return Err("chain ends");
        }
        if !seen.insert(next) {
            return Err("loop");
        }
        let Some(p) = pages.get(&next) else {
            return Err("map: no such grant");
        };
        match (p.access, write.is_some()) {
            (Access::Rw, _) | (Access::Ro, false) => {}
            _ => return Err("map: refused"),
        }
        let n = (count - out.len()).min(PER_PAGE);
        match write {
            Some(refs) => out.extend_from_slice(&refs[out.len()..out.len() + n]),
            None => {
                let words = &p.words[1..1 + n];
                if words.contains(&0) {
                    return Err("zero ref");
                }
                out.extend_from_slice(words);
            }
        }
        next = p.words[0];
    }
    // A read refuses a ref named twice, or a directory page named as a buffer page.
    if write.is_none() {
        let mut named = HashSet::new();
        if out.iter().any(|r| !named.insert(*r) || seen.contains(r)) {
            return Err("duplicate");
        }
    }
    Ok(out)
}

/// A ref: mostly one of our pages (`from` + 1 + selector, so that running out of fuzz
/// bytes makes a chain through every page), sometimes 0 or any u32.
fn pick_ref(u: &mut Unstructured, refs: &[u32], from: usize) -> Result<u32> {
    Ok(match u.arbitrary::<u8>()? {
        s @ 0..=0x9f => refs[(from + 1 + usize::from(s)) % refs.len()],
        0xa0..=0xbf => 0,
        _ => u.arbitrary()?,
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let sim = SimXen::new();
    let mem = sim.guest_mem(GUEST);
    let mapper = sim.grant_mapper(DomId(0));

    // Directory pages, each its own allocation and grant.
    let n = u.int_in_range(1..=6usize)?;
    let mut owned: Vec<SimPages> = Vec::new();
    let mut pages: Vec<Page> = Vec::new();
    for _ in 0..n {
        let access = match u.arbitrary::<u8>()? % 8 {
            0..=4 => Access::Rw,
            5 => Access::Ro,
            6 => Access::Foreign,
            _ => Access::Ended,
        };
        let p = mem.alloc(1).expect("sim alloc");
        let to = if access == Access::Foreign { OTHER } else { DomId(0) };
        let refs = mem.grant(&p, to, access == Access::Ro);
        assert_eq!(refs.len(), 1);
        if access == Access::Ended {
            mem.end_access(&refs).expect("end access of an unmapped grant");
        }
        pages.push(Page { gref: refs[0].0, access, words: vec![0; 1024] });
        owned.push(p);
    }
    let grefs: Vec<u32> = pages.iter().map(|p| p.gref).collect();

    // Their contents: a next ref, a fill word, a raw prefix of ref words, a poked zero.
    // (Exhausted fuzz bytes read as 0: the defaults are a full, valid chain.)
    for (i, (p, sp)) in pages.iter_mut().zip(&owned).enumerate() {
        p.words[NEXT] = pick_ref(u, &grefs, i)?;
        let fill: u32 = match u.arbitrary::<u8>()? {
            0xff => 0,
            _ => u.arbitrary::<u32>()?.max(1),
        };
        p.words[1..].fill(fill);
        let prefix = u.int_in_range(0..=32usize)?;
        for j in 0..prefix {
            p.words[1 + j] = pick_ref(u, &grefs, i)?;
        }
        if u.arbitrary::<u8>()? == 0xfe {
            let at = u.int_in_range(0..=PER_PAGE - 1)?;
            p.words[1 + at] = 0;
        }
        let raw: Vec<u8> = p.words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        sp.region().write(0, &raw).expect("one page");
    }
    let by_ref: HashMap<u32, &Page> = pages.iter().map(|p| (p.gref, p)).collect();
    let first = pick_ref(u, &grefs, n - 1)?;

    // How many refs to ask for: around page boundaries, or anything a u32 buffer_sz
    // can imply (the callers' domain: pages_for(u32::MAX) = 2^20).
    let boundary = |k: usize, d: u8| (k * PER_PAGE + usize::from(d)).saturating_sub(1);
    let count = match u.arbitrary::<u8>()? % 4 {
        0 => u.int_in_range(0..=4usize)?,
        1 => u.int_in_range(0..=n * PER_PAGE + 2)?,
        2 => boundary(u.int_in_range(0..=n + 1)?, u.int_in_range(0..=2)?),
        _ => u.int_in_range(0..=pages_for(u64::from(u32::MAX)) as usize)?,
    };

    // read_refs.
    let got = read_refs(&*mapper, GUEST, first, count);
    let want = model(&by_ref, first, count, None);
    match (&got, &want) {
        (Ok(refs), Ok(w)) => {
            assert!(refs.len() <= count, "{} refs for {count}", refs.len());
            assert_eq!(refs.len(), count);
            assert!(refs.iter().map(|r| r.0).eq(w.iter().copied()));
        }
        (Err(e), Err(_)) => {
            assert!(matches!(e.errno(), libc::EINVAL | libc::ENOMEM), "{e}");
        }
        _ => panic!("read_refs(first {first}, count {count}) = {got:?}, model says {want:?}"),
    }
    assert_eq!(mapper.mapped_pages(), 0, "read_refs leaked a mapping");
    drop(got);

    // write_refs with fuzz refs.
    let m = match u.arbitrary::<u8>()? % 3 {
        0 => u.int_in_range(0..=4usize)?,
        1 => u.int_in_range(0..=n * PER_PAGE + 2)?,
        _ => boundary(u.int_in_range(0..=n + 1)?, u.int_in_range(0..=2)?),
    };
    let base: u32 = u.arbitrary()?;
    let mut refs: Vec<u32> = (0..m as u32).map(|i| base.wrapping_add(i)).collect();
    for r in refs.iter_mut().take(u.int_in_range(0..=16usize)?) {
        *r = u.arbitrary()?;
    }
    let wfirst = if u.ratio(1, 2)? { first } else { pick_ref(u, &grefs, n - 1)? };
    let grant_refs: Vec<GrantRef> = refs.iter().map(|&r| GrantRef(r)).collect();
    let wrote = write_refs(&*mapper, GUEST, wfirst, &grant_refs);
    let want = model(&by_ref, wfirst, m, Some(&refs));
    assert_eq!(mapper.mapped_pages(), 0, "write_refs leaked a mapping");
    match (&wrote, &want) {
        (Ok(()), Ok(_)) => {
            // The guest sees the refs in its chain, and reading them back agrees
            // (unless one is 0, which read_refs must refuse).
            let mut next = wfirst;
            let mut at = 0;
            let mut dirs = HashSet::new();
            while at < m {
                dirs.insert(next);
                let i = grefs.iter().position(|&g| g == next).expect("chain page");
                let n = (m - at).min(PER_PAGE);
                let mut raw = vec![0u8; n * 4];
                owned[i].region().read(GREFS, &mut raw).expect("in page");
                let words: Vec<u32> = raw
                    .chunks_exact(4)
                    .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
                    .collect();
                assert_eq!(words, refs[at..at + n]);
                at += n;
                next = pages[i].words[NEXT];
            }
            let back = read_refs(&*mapper, GUEST, wfirst, m);
            let mut named = HashSet::new();
            let repeated = refs.iter().any(|r| !named.insert(*r) || dirs.contains(r));
            if refs.contains(&0) || repeated {
                assert!(back.is_err(), "read back a zero or repeated ref");
            } else {
                let back = back.expect("read back what was written");
                assert!(back.iter().map(|r| r.0).eq(refs.iter().copied()));
            }
            assert_eq!(mapper.mapped_pages(), 0, "read_refs leaked a mapping");
        }
        (Err(e), Err(_)) => {
            assert!(matches!(e.errno(), libc::EINVAL | libc::ENOMEM), "{e}");
        }
        _ => panic!("write_refs(first {wfirst}, {m} refs) = {wrote:?}, model says {want:?}"),
    }
    drop(owned);
    assert_eq!(sim.total_mapped_pages(), 0);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
