//! End to end on the simulated Xen: the real backend event loop against a frontend that
//! behaves like Linux's xen-drm-front, with the headless output showing the frames.

mod common;

use std::time::{Duration, Instant};

use common::*;
use displback::displif::format::PixelFormat;
use displback::displif::request::Request;
use displback::xen::DomId;

const W: u32 = 1920;
const H: u32 = 1080;

#[test]
fn handshake_publishes_versions_and_connects_both_sides() {
    let mut rig = Rig::new();
    let fe = rig.guest(1, &[("Virtual-1", 1024, 768)]);
    assert_eq!(
        rig.read("/local/domain/0/backend/vdispl/1/0/state")
            .as_deref(),
        Some("4")
    );
    assert_eq!(
        rig.read("/local/domain/0/backend/vdispl/1/0/versions")
            .as_deref(),
        Some("1,2")
    );
    assert_eq!(
        rig.read("/local/domain/1/device/vdispl/0/state").as_deref(),
        Some("4")
    );
    assert_eq!(fe.connectors().len(), 1);
}

#[test]
fn full_cycle_at_1080p_shows_every_flip_and_unmaps_on_destroy() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", W, H)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 2, W, H, PixelFormat::Xrgb8888);
    // 1920x1080x4 = 2025 pages each, plus the directories the backend maps only briefly.
    assert_eq!(rig.sim.total_mapped_pages(), baseline + 2 * 2025);
    draw(&bufs[0].0, PixelFormat::Xrgb8888, 0, 0);
    fe.set_config(0, bufs[0].1, W, H, 32).unwrap();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 0, 0, W, H),
        W,
        H,
    );
    let t0 = Instant::now();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 30);
    let secs = t0.elapsed().as_secs_f64();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 30, 0, W, H),
        W,
        H,
    );
    // Flips complete on 60 Hz ticks: 30 flips cannot take less than ~29 periods.
    assert!(
        secs > 29.0 / 60.0,
        "30 flips in {secs:.3} s is faster than 60 Hz"
    );
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        let outcome = fe.destroy_dumb(buf).unwrap();
        assert_eq!(outcome.status, 0);
        assert!(
            outcome.end_access_ok,
            "a guest page was still mapped after DBUF_DESTROY's reply"
        );
    }
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
    fe.set_config(0, 0, 0, 0, 0).unwrap();
}

#[test]
fn every_pixel_format_is_shown_correctly() {
    let mut rig = Rig::new();
    let (w, h) = (318, 200); // odd-ish width: RGB888 pitch is not a multiple of 4
    let mut fe = rig.guest(1, &[("Virtual-1", w, h)]);
    for (i, format) in PixelFormat::ALL.into_iter().enumerate() {
        let bufs = buffers(&mut fe, 2, w, h, format);
        draw(&bufs[0].0, format, i as u32, 0);
        fe.set_config(0, bufs[0].1, w, h, format.bpp()).unwrap();
        assert_image(&rig.frame(1, 0), &expected(format, i as u32, 0, w, h), w, h);
        flip_frames(&mut fe, 0, &bufs, format, 3);
        assert_image(&rig.frame(1, 0), &expected(format, 3, 0, w, h), w, h);
        for (buf, fb) in bufs {
            fe.detach_fb(fb).unwrap();
            assert_eq!(fe.destroy_dumb(buf).unwrap().status, 0, "{format:?}");
        }
    }
}

#[test]
fn four_connectors_each_show_their_own_picture() {
    let mut rig = Rig::new();
    let conns = [
        ("Virtual-1", 640, 480),
        ("Virtual-2", 800, 600),
        ("Virtual-3", 320, 240),
        ("Virtual-4", 1024, 768),
    ];
    let mut fe = rig.guest(1, &conns);
    let mut all = Vec::new();
    for (c, (_, w, h)) in conns.iter().enumerate() {
        let bufs = buffers(&mut fe, 2, *w, *h, PixelFormat::Xrgb8888);
        draw(&bufs[0].0, PixelFormat::Xrgb8888, 0, c as u32);
        fe.set_config(c as u32, bufs[0].1, *w, *h, 32).unwrap();
        all.push(bufs);
    }
    for (c, bufs) in all.iter().enumerate() {
        flip_frames(&mut fe, c as u32, bufs, PixelFormat::Xrgb8888, 5);
    }
    for (c, (_, w, h)) in conns.iter().enumerate() {
        assert_image(
            &rig.frame(1, c as u32),
            &expected(PixelFormat::Xrgb8888, 5, c as u32, *w, *h),
            *w,
            *h,
        );
    }
    // Connector-specific requests go on the connector's own ring: SET_CONFIG on ring 2.
    assert_eq!(
        fe.request(
            2,
            Request::SetConfig {
                fb_cookie: 0,
                x: 0,
                y: 0,
                width: 0,
                height: 0,
                bpp: 0
            }
        )
        .unwrap()
        .status,
        0
    );
}

#[test]
fn two_guests_flip_at_the_same_time() {
    let mut rig = Rig::new();
    let fe1 = rig.guest(1, &[("Virtual-1", 640, 480)]);
    let fe2 = rig.guest(2, &[("Virtual-2", 800, 600)]);
    let run = |mut fe: displback::sim::frontend::FrontendSim, w, h, conn_pattern| {
        std::thread::spawn(move || {
            let bufs = buffers(&mut fe, 2, w, h, PixelFormat::Rgb565);
            draw(&bufs[0].0, PixelFormat::Rgb565, 0, conn_pattern);
            fe.set_config(0, bufs[0].1, w, h, 16).unwrap();
            for f in 1..=30 {
                let (buf, fb) = &bufs[(f % 2) as usize];
                draw(buf, PixelFormat::Rgb565, f, conn_pattern);
                fe.page_flip(0, *fb).unwrap();
                fe.wait_flip_event(0, *fb, FLIP_WAIT).unwrap();
            }
            fe
        })
    };
    let (t1, t2) = (run(fe1, 640, 480, 0), run(fe2, 800, 600, 1));
    let (_fe1, _fe2) = (t1.join().unwrap(), t2.join().unwrap());
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Rgb565, 30, 0, 640, 480),
        640,
        480,
    );
    assert_image(
        &rig.frame(2, 0),
        &expected(PixelFormat::Rgb565, 30, 1, 800, 600),
        800,
        600,
    );
}

#[test]
fn a_guest_cannot_use_another_guests_cookies() {
    let mut rig = Rig::new();
    let mut fe1 = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let mut fe2 = rig.guest(2, &[("Virtual-2", 64, 64)]);
    let bufs = buffers(&mut fe1, 1, 64, 64, PixelFormat::Xrgb8888);
    let (dbuf, fb) = (bufs[0].0.cookie, bufs[0].1);
    let errno = |r: displback::displif::wire::Resp| r.status;
    assert_eq!(
        errno(fe2.request(0, Request::PgFlip { fb_cookie: fb }).unwrap()),
        -libc::ENOENT
    );
    assert_eq!(
        errno(fe2.request(0, Request::FbDetach { fb_cookie: fb }).unwrap()),
        -libc::ENOENT
    );
    assert_eq!(
        errno(
            fe2.request(0, Request::DbufDestroy { dbuf_cookie: dbuf })
                .unwrap()
        ),
        -libc::ENOENT
    );
    // ... and can reuse the same cookie values for its own buffers.
    let b2 = fe2.create_dumb(64, 64, 32).unwrap();
    assert_ne!(b2.cookie, 0);
    fe1.set_config(0, fb, 64, 64, 32).unwrap();
}

#[test]
fn frontend_restart_reconnects_with_fresh_state() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 320, 240)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 2, 320, 240, PixelFormat::Xrgb8888);
    fe.set_config(0, bufs[0].1, 320, 240, 32).unwrap();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 3);
    let old_fb = bufs[0].1;
    drop(bufs); // a rebooting guest does not destroy its buffers
    fe.restart().unwrap();
    fe.wait_connected(WAIT).unwrap();
    // The backend dropped the old connection's buffers: only the new rings are mapped.
    assert!(
        rig.sim.total_mapped_pages() <= baseline,
        "{} > {baseline}",
        rig.sim.total_mapped_pages()
    );
    assert_eq!(
        fe.request(0, Request::PgFlip { fb_cookie: old_fb })
            .unwrap()
            .status,
        -libc::ENOENT
    );
    let _bufs = show_and_flip(&rig, &mut fe, 1, 0, (320, 240), 3);
}

#[test]
fn domain_death_tears_down_and_other_guests_continue() {
    let mut rig = Rig::new();
    let mut fe1 = rig.guest(1, &[("Virtual-1", 640, 480)]);
    let mut fe2 = rig.guest(2, &[("Virtual-2", 320, 240)]);
    let before = rig.sim.total_mapped_pages();
    let bufs1 = buffers(&mut fe1, 2, 640, 480, PixelFormat::Xrgb8888);
    fe1.set_config(0, bufs1[0].1, 640, 480, 32).unwrap();
    flip_frames(&mut fe1, 0, &bufs1, PixelFormat::Xrgb8888, 2);
    fe1.page_flip(0, bufs1[0].1).unwrap(); // dies with a flip in flight
    let sim = rig.sim.clone();
    rig.toolstack
        .destroy_domain(&sim, BACKEND, DomId(1))
        .unwrap();
    // Every page of guest 1 (rings, buffers) is unmapped by the backend.
    let deadline = Instant::now() + WAIT;
    while rig.sim.total_mapped_pages() > before - 2 {
        assert!(
            Instant::now() < deadline,
            "guest 1's pages stay mapped: {}",
            rig.sim.total_mapped_pages()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(bufs1);
    drop(fe1);
    let _bufs2 = show_and_flip(&rig, &mut fe2, 2, 0, (320, 240), 5);
    // The same domain id can come back as a new guest.
    let mut fe1b = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let b = buffers(&mut fe1b, 2, 64, 64, PixelFormat::Xrgb8888);
    fe1b.set_config(0, b[0].1, 64, 64, 32).unwrap();
    flip_frames(&mut fe1b, 0, &b, PixelFormat::Xrgb8888, 2);
}

#[test]
fn toolstack_removal_reaches_closed_in_time() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let baseline = rig.sim.total_mapped_pages();
    let bufs = buffers(&mut fe, 1, 64, 64, PixelFormat::Xrgb8888);
    fe.set_config(0, bufs[0].1, 64, 64, 32).unwrap();
    let t0 = Instant::now();
    let closed = rig.toolstack.remove_vdispl(BACKEND, DomId(1), 0).unwrap();
    assert!(closed, "backend did not reach Closed within libxl's 10 s");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "removal took {:?}",
        t0.elapsed()
    );
    let deadline = Instant::now() + WAIT;
    while rig.sim.total_mapped_pages() >= baseline {
        assert!(
            Instant::now() < deadline,
            "buffers stay mapped after removal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn backend_restart_while_guest_connected() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 320, 240)]);
    let bufs = buffers(&mut fe, 2, 320, 240, PixelFormat::Xrgb8888);
    fe.set_config(0, bufs[0].1, 320, 240, 32).unwrap();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 2);
    drop(bufs);
    let reconnects = fe.reconnects();
    rig.restart_backend_after_crash();
    // The new backend walks the device through Closed; the guest unplugs and reconnects.
    let deadline = Instant::now() + WAIT;
    while fe.reconnects() == reconnects || fe.state() != displback::xen::XenbusState::Connected {
        assert!(
            Instant::now() < deadline,
            "guest never reconnected (state {:?})",
            fe.state()
        );
        fe.pump(Duration::from_millis(20)).unwrap();
    }
    let _bufs = show_and_flip(&rig, &mut fe, 1, 0, (320, 240), 3);
}

#[test]
fn get_edid_describes_the_connector() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 1280, 720)]);
    let edid = fe.get_edid(0).unwrap();
    assert_eq!(edid.len(), 128);
    assert_eq!(&edid[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(edid.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let dtd = &edid[54..72];
    let hactive = u32::from(dtd[2]) | (u32::from(dtd[4]) >> 4) << 8;
    let vactive = u32::from(dtd[5]) | (u32::from(dtd[7]) >> 4) << 8;
    assert_eq!((hactive, vactive), (1280, 720));
}

#[test]
fn get_edid_accepts_any_buffer_that_holds_the_edid_and_touches_only_its_page() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 1280, 720)]);
    let want = fe.get_edid(0).unwrap();
    let baseline = rig.sim.total_mapped_pages();
    // Larger than XENDISPL_EDID_MAX_SIZE (displif.h asks for at least that much).
    assert_eq!(fe.get_edid_sized(0, 64 * 1024, 64 * 1024).unwrap(), want);
    // A huge buffer_sz backed by one page: only the first page is looked at.
    assert_eq!(fe.get_edid_sized(0, u32::MAX, 4096).unwrap(), want);
    assert_eq!(rig.sim.total_mapped_pages(), baseline);
    // Smaller than the EDID: EINVAL.
    assert!(matches!(
        fe.get_edid_sized(0, 64, 4096),
        Err(displback::sim::frontend::FrontError::Status(s)) if s == -libc::EINVAL
    ));
}

#[test]
fn backend_allocated_buffers_through_gntalloc() {
    let mut rig = Rig::new();
    let mut fe = rig.guest_with(1, true, &[("Virtual-1", 640, 480)]);
    assert!(fe.be_alloc());
    let mut bufs = Vec::new();
    for _ in 0..2 {
        let buf = fe.create_dumb_be_alloc(640, 480, 32).unwrap();
        assert!(buf.is_be_alloc());
        let fb = fe
            .attach_fb(&buf, 640, 480, PixelFormat::Xrgb8888.fourcc())
            .unwrap();
        bufs.push((buf, fb));
    }
    draw(&bufs[0].0, PixelFormat::Xrgb8888, 0, 0);
    fe.set_config(0, bufs[0].1, 640, 480, 32).unwrap();
    flip_frames(&mut fe, 0, &bufs, PixelFormat::Xrgb8888, 4);
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Xrgb8888, 4, 0, 640, 480),
        640,
        480,
    );
    for (buf, fb) in bufs {
        fe.detach_fb(fb).unwrap();
        assert_eq!(fe.destroy_dumb(buf).unwrap().status, 0);
    }
}

#[test]
fn prime_imported_buffer_takes_geometry_from_fb_attach() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 100, 50)]);
    // A buffer created like a PRIME import: no geometry, an offset into the first page.
    let pages = 5;
    let mem = rig.sim.guest_mem(DomId(1));
    let data = mem.alloc(pages).unwrap();
    let refs = mem.grant(&data, BACKEND, false);
    let dir = mem.alloc(1).unwrap();
    let dir_refs = mem.grant(&dir, BACKEND, false);
    let mut page = vec![0u8; 4096];
    for (i, r) in refs.iter().enumerate() {
        page[4 + i * 4..8 + i * 4].copy_from_slice(&r.0.to_ne_bytes());
    }
    dir.region().write(0, &page).unwrap();
    let data_ofs = 64u32;
    let cookie = 0xabc0;
    let resp = fe
        .request(
            0,
            Request::DbufCreate {
                dbuf_cookie: cookie,
                width: 0,
                height: 0,
                bpp: 0,
                buffer_sz: (pages * 4096) as u32,
                flags: 0,
                gref_directory: dir_refs[0].0,
                data_ofs,
            },
        )
        .unwrap();
    assert_eq!(resp.status, 0);
    // Draw RGB565 at data_ofs with the dumb pitch of the fb width.
    let pitch = 200usize;
    let mut row = vec![0u8; pitch];
    for y in 0..50 {
        displback::sim::pattern::draw_row(PixelFormat::Rgb565, 9, 0, y, &mut row);
        data.region()
            .write(data_ofs as usize + y as usize * pitch, &row)
            .unwrap();
    }
    let attach = Request::FbAttach {
        dbuf_cookie: cookie,
        fb_cookie: 0xf00,
        width: 100,
        height: 50,
        pixel_format: PixelFormat::Rgb565.fourcc(),
    };
    assert_eq!(fe.request(0, attach).unwrap().status, 0);
    fe.set_config(0, 0xf00, 100, 50, 16).unwrap();
    assert_image(
        &rig.frame(1, 0),
        &expected(PixelFormat::Rgb565, 9, 0, 100, 50),
        100,
        50,
    );
}
