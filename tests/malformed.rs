//! Hostile input: a table of malformed requests, each answered with the right negative
//! errno while another guest keeps flipping at 60 Hz; and a frontend that overflows its
//! ring gets only its own connection closed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use displback::displif::budget::Limits;
use displback::displif::format::PixelFormat;
use displback::displif::request::Request;
use displback::sim::frontend::FrontendSim;
use displback::sim::{SimGuestMem, SimPages};
use displback::xen::DomId;

/// Guest 2 flips at 60 Hz until told to stop; returns (flips, worst event latency).
/// Returns once its buffers are set up.
fn flipper(mut fe: FrontendSim, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u32, Duration)> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        let bufs = buffers(&mut fe, 2, 320, 240, PixelFormat::Xrgb8888);
        fe.set_config(0, bufs[0].1, 320, 240, 32).unwrap();
        ready_tx.send(()).unwrap();
        let (mut flips, mut worst) = (0u32, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let fb = bufs[(flips % 2) as usize].1;
            let t0 = Instant::now();
            fe.page_flip(0, fb).unwrap();
            fe.wait_flip_event(0, fb, FLIP_WAIT).unwrap();
            worst = worst.max(t0.elapsed());
            flips += 1;
        }
        (flips, worst)
    });
    ready.recv().unwrap();
    handle
}

/// A directory page naming `refs`, with `next` as its next-page link, granted to dom0.
fn dir_page(mem: &SimGuestMem, refs: &[u32], next: u32) -> (SimPages, u32) {
    let page = mem.alloc(1).unwrap();
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(&next.to_ne_bytes());
    for (i, r) in refs.iter().enumerate() {
        bytes[4 + i * 4..8 + i * 4].copy_from_slice(&r.to_ne_bytes());
    }
    page.region().write(0, &bytes).unwrap();
    let gref = mem.grant(&page, BACKEND, false)[0];
    (page, gref.0)
}

#[allow(clippy::too_many_arguments)]
fn create(
    cookie: u64,
    w: u32,
    h: u32,
    bpp: u32,
    size: u32,
    flags: u32,
    dir: u32,
    ofs: u32,
) -> Request {
    Request::DbufCreate {
        dbuf_cookie: cookie,
        width: w,
        height: h,
        bpp,
        buffer_sz: size,
        flags,
        gref_directory: dir,
        data_ofs: ofs,
    }
}

#[test]
fn malformed_requests_get_the_right_errno_while_another_guest_flips() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64), ("Virtual-2", 64, 64)]);
    let fe2 = rig.guest(2, &[("Virtual-3", 320, 240)]);
    let stop = Arc::new(AtomicBool::new(false));
    let other = flipper(fe2, stop.clone());

    // Valid objects to collide with.
    let good = buffers(&mut fe, 1, 64, 64, PixelFormat::Xrgb8888);
    let (good_dbuf, good_fb) = (good[0].0.cookie, good[0].1);
    let baseline = rig.sim.total_mapped_pages();

    let mem1 = rig.sim.guest_mem(DomId(1));
    let mem2 = rig.sim.guest_mem(DomId(2));
    // One data page of guest 1 and one of guest 2, both granted to the backend.
    let data1 = mem1.alloc(1).unwrap();
    let data1_ref = mem1.grant(&data1, BACKEND, false)[0].0;
    // Grant refs are per domain: give guest 2's data page a ref number guest 1 never
    // reaches, so "another guest's grant ref" cannot name one of guest 1's own pages.
    let pad2 = mem2.alloc(4096).unwrap();
    let _pad2_refs = mem2.grant(&pad2, BACKEND, false);
    let data2 = mem2.alloc(1).unwrap();
    let data2_ref = mem2.grant(&data2, BACKEND, false)[0].0;
    let (_d_ok, dir_ok) = dir_page(&mem1, &[data1_ref], 0);
    let (_d_zero, dir_zero_ref) = dir_page(&mem1, &[0], 0);
    let (_d_bogus, dir_bogus_data) = dir_page(&mem1, &[99_999], 0);
    let (_d_foreign, dir_foreign) = dir_page(&mem1, &[data2_ref], 0);
    // 1023 distinct granted data pages (a ref named twice is refused on its own).
    let data_many = mem1.alloc(1023).unwrap();
    let many: Vec<u32> = mem1
        .grant(&data_many, BACKEND, false)
        .iter()
        .map(|r| r.0)
        .collect();
    let (_d_short, dir_short) = dir_page(&mem1, &many, 0);
    let (_d_twice, dir_twice) = dir_page(&mem1, &[data1_ref, data1_ref], 0);
    // A directory page naming itself as a buffer page.
    let selfish = mem1.alloc(1).unwrap();
    let selfish_ref = mem1.grant(&selfish, BACKEND, false)[0].0;
    let mut bytes = vec![0u8; 4096];
    bytes[4..8].copy_from_slice(&selfish_ref.to_ne_bytes());
    selfish.region().write(0, &bytes).unwrap();
    // A page whose next link points at itself: allocate, learn its ref, then write.
    let looping = mem1.alloc(1).unwrap();
    let loop_ref = mem1.grant(&looping, BACKEND, false)[0].0;
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(&loop_ref.to_ne_bytes());
    for (i, r) in many.iter().enumerate() {
        bytes[4 + i * 4..8 + i * 4].copy_from_slice(&r.to_ne_bytes());
    }
    looping.region().write(0, &bytes).unwrap();

    let pg = 4096u32;
    let xr24 = PixelFormat::Xrgb8888.fourcc();
    #[rustfmt::skip]
    let table: Vec<(&str, u32, Request, i32)> = vec![
        ("dbuf cookie 0", 0, create(0, 16, 16, 32, 1024, 0, dir_ok, 0), libc::EINVAL),
        ("duplicate dbuf cookie", 0, create(good_dbuf, 16, 16, 32, 1024, 0, dir_ok, 0), libc::EEXIST),
        ("directory gref 0", 0, create(1, 16, 16, 32, 1024, 0, 0, 0), libc::EINVAL),
        ("buffer_sz 0", 0, create(1, 0, 0, 0, 0, 0, dir_ok, 0), libc::EINVAL),
        ("buffer_sz 4 GiB", 0, create(1, 0, 0, 0, u32::MAX, 0, dir_ok, 0), libc::E2BIG),
        ("geometry larger than buffer_sz", 0, create(1, 64, 64, 32, pg, 0, dir_ok, 0), libc::EINVAL),
        ("geometry overflows u32", 0, create(1, u32::MAX, u32::MAX, 32, pg, 0, dir_ok, 0), libc::EINVAL),
        ("bpp 7", 0, create(1, 16, 16, 7, 1024, 0, dir_ok, 0), libc::EINVAL),
        ("unknown flags", 0, create(1, 16, 16, 32, 1024, 0x2, dir_ok, 0), libc::EINVAL),
        ("data_ofs past buffer_sz", 0, create(1, 0, 0, 0, 1024, 0, dir_ok, 1024), libc::EINVAL),
        ("directory gref not granted", 0, create(1, 16, 16, 32, 1024, 0, 77_777, 0), libc::EINVAL),
        ("directory chain ends early", 0, create(1, 0, 0, 0, 1100 * pg, 0, dir_short, 0), libc::EINVAL),
        ("directory chain loops", 0, create(1, 0, 0, 0, 3000 * pg, 0, loop_ref, 0), libc::EINVAL),
        ("grant ref named twice", 0, create(1, 0, 0, 0, 2 * pg, 0, dir_twice, 0), libc::EINVAL),
        ("directory page named as a buffer page", 0, create(1, 0, 0, 0, pg, 0, selfish_ref, 0), libc::EINVAL),
        ("REQ_ALLOC without be-alloc=1", 0, create(1, 16, 16, 32, 1024, 1, dir_ok, 0), libc::EINVAL),
        ("grant ref 0 in directory", 0, create(1, 16, 16, 32, 1024, 0, dir_zero_ref, 0), libc::EINVAL),
        ("data gref not granted", 0, create(1, 16, 16, 32, 1024, 0, dir_bogus_data, 0), libc::EINVAL),
        ("another guest's grant ref", 0, create(1, 16, 16, 32, 1024, 0, dir_foreign, 0), libc::EINVAL),
        ("be-alloc with data_ofs", 0, create(1, 16, 16, 32, 1024, 1, dir_ok, 64), libc::EINVAL),
        ("buffer op on connector 1's ring", 1, create(1, 16, 16, 32, 1024, 0, dir_ok, 0), libc::EINVAL),
        ("destroy unknown dbuf", 0, Request::DbufDestroy { dbuf_cookie: 0xdead }, libc::ENOENT),
        ("attach to unknown dbuf", 0, Request::FbAttach { dbuf_cookie: 0xdead, fb_cookie: 9, width: 8, height: 8, pixel_format: xr24 }, libc::ENOENT),
        ("fb cookie 0", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 0, width: 8, height: 8, pixel_format: xr24 }, libc::EINVAL),
        ("duplicate fb cookie", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: good_fb, width: 8, height: 8, pixel_format: xr24 }, libc::EEXIST),
        ("unsupported fourcc", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 9, width: 8, height: 8, pixel_format: 0x3231_564e }, libc::EINVAL),
        ("fb larger than its buffer", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 9, width: 65, height: 64, pixel_format: xr24 }, libc::EINVAL),
        ("fb width 0", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 9, width: 0, height: 8, pixel_format: xr24 }, libc::EINVAL),
        ("fb width overflows", 0, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 9, width: u32::MAX, height: 1, pixel_format: xr24 }, libc::EINVAL),
        ("fb op on connector 1's ring", 1, Request::FbAttach { dbuf_cookie: good_dbuf, fb_cookie: 9, width: 8, height: 8, pixel_format: xr24 }, libc::EINVAL),
        ("detach unknown fb", 0, Request::FbDetach { fb_cookie: 0xbeef }, libc::ENOENT),
        ("set_config unknown fb", 0, Request::SetConfig { fb_cookie: 0xbeef, x: 0, y: 0, width: 64, height: 64, bpp: 32 }, libc::ENOENT),
        ("set_config bpp mismatch", 0, Request::SetConfig { fb_cookie: good_fb, x: 0, y: 0, width: 64, height: 64, bpp: 16 }, libc::EINVAL),
        ("set_config x + width overflows", 0, Request::SetConfig { fb_cookie: good_fb, x: u32::MAX, y: 0, width: 2, height: 64, bpp: 32 }, libc::EINVAL),
        ("set_config area outside fb", 0, Request::SetConfig { fb_cookie: good_fb, x: 1, y: 0, width: 64, height: 64, bpp: 32 }, libc::EINVAL),
        ("set_config height 0", 0, Request::SetConfig { fb_cookie: good_fb, x: 0, y: 0, width: 64, height: 0, bpp: 32 }, libc::EINVAL),
        ("flip unknown fb", 0, Request::PgFlip { fb_cookie: 0xbeef }, libc::ENOENT),
        ("flip on a disabled connector", 1, Request::PgFlip { fb_cookie: good_fb }, libc::EINVAL),
        ("EDID buffer too small", 0, Request::GetEdid { buffer_sz: 16, gref_directory: dir_ok }, libc::EINVAL),
        ("EDID directory 0", 0, Request::GetEdid { buffer_sz: 4096, gref_directory: 0 }, libc::EINVAL),
        ("unknown operation 0x42", 0, Request::Unknown(0x42), libc::ENOSYS),
        ("operation 0 (reserved)", 0, Request::Unknown(0), libc::ENOSYS),
    ];
    assert!(table.len() >= 25);
    let mut failures = Vec::new();
    for (what, conn, req, errno) in &table {
        let resp = fe
            .request(*conn, *req)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if resp.status != -errno {
            failures.push(format!(
                "{what}: status {} (expected {})",
                resp.status, -errno
            ));
        }
    }
    // Nothing a refused request mapped stays mapped, and the good objects still work.
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
    fe.set_config(0, good_fb, 64, 64, 32).unwrap();
    fe.page_flip(0, good_fb).unwrap();
    fe.wait_flip_event(0, good_fb, FLIP_WAIT).unwrap();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (flips, worst) = other.join().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The other guest kept its 60 Hz: no flip waited more than a few vblanks.
    assert!(flips >= 15, "the other guest flipped only {flips} times");
    assert!(
        worst < Duration::from_millis(250),
        "the other guest waited {worst:?} for a flip"
    );
}

#[test]
fn ring_overflow_closes_only_that_connection() {
    let mut rig = Rig::new();
    let mut bad = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let good = rig.guest(2, &[("Virtual-2", 320, 240)]);
    let stop = Arc::new(AtomicBool::new(false));
    let other = flipper(good, stop.clone());
    let bufs = buffers(&mut bad, 1, 64, 64, PixelFormat::Xrgb8888);
    // Claim 40 requests on a 32-slot ring.
    bad.flood(0, 40).unwrap();
    rig.wait_node("/local/domain/0/backend/vdispl/1/0/state", "6");
    drop(bufs);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (flips, worst) = other.join().unwrap();
    assert!(flips >= 10, "the other guest flipped only {flips} times");
    assert!(
        worst < Duration::from_millis(250),
        "the other guest waited {worst:?}"
    );
    assert_eq!(
        rig.read("/local/domain/0/backend/vdispl/2/0/state")
            .as_deref(),
        Some("4")
    );
}

#[test]
fn a_busy_guest_does_not_starve_another_and_is_closed_past_its_refusal_limit() {
    // Guest 1 keeps its ring full of cheap bad requests; guest 2's flips still complete,
    // and guest 1's connection is closed once it passes max_refusals_per_sec (200).
    let mut rig = Rig::new();
    let mut busy = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let good = rig.guest(2, &[("Virtual-2", 320, 240)]);
    let stop = Arc::new(AtomicBool::new(false));
    let other = flipper(good, stop.clone());
    let t0 = Instant::now();
    let mut answered = 0u32;
    'flood: while t0.elapsed() < Duration::from_millis(600) {
        for _ in 0..32 {
            busy.send_raw(0, Request::FbDetach { fb_cookie: 1 }.encode(0))
                .unwrap();
        }
        for _ in 0..32 {
            match busy.wait_response_raw(0, Duration::from_millis(500)) {
                Ok(r) => {
                    assert_eq!(r.status, -libc::ENOENT);
                    answered += 1;
                }
                Err(_) => break 'flood,
            }
        }
    }
    rig.wait_node("/local/domain/0/backend/vdispl/1/0/state", "6");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (flips, worst) = other.join().unwrap();
    let limit = Limits::default().max_refusals_per_sec;
    assert!(
        answered > limit && answered <= limit + 64,
        "{answered} refusals answered before the close (limit {limit}/s)"
    );
    assert!(flips >= 15, "the other guest flipped only {flips} times");
    assert!(
        worst < Duration::from_millis(250),
        "the other guest waited {worst:?}"
    );
    assert_eq!(
        rig.read("/local/domain/0/backend/vdispl/2/0/state")
            .as_deref(),
        Some("4")
    );
}
