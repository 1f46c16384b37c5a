//! Guest isolation on the simulated Xen: refresh-paced latest-wins flips, per-guest
//! budgets (with the errno each refusal gets), be-alloc pages charged while the guest
//! may still map them, SET_CONFIG rate, misbehaviour holds, and detach/attach.

mod common;

use std::time::{Duration, Instant};

use common::*;
use displback::displif::budget::Limits;
use displback::displif::format::PixelFormat;
use displback::displif::request::Request;
use displback::sim::frontend::{FrontError, FrontendSim};
use displback::xen::xenstore::XsClient;
use displback::xen::DomId;

const XR24: PixelFormat = PixelFormat::Xrgb8888;

fn status_of<T>(r: Result<T, FrontError>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(FrontError::Status(s)) => s,
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn a_flip_flood_copies_one_frame_per_refresh_and_answers_every_flip_in_order() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 320, 240)]);
    let bufs = buffers(&mut fe, 2, 320, 240, XR24);
    draw(&bufs[0].0, XR24, 10, 0);
    draw(&bufs[1].0, XR24, 11, 0);
    fe.set_config(0, bufs[0].1, 320, 240, 32).unwrap();
    let shown_before = rig.view.frames_shown(conn_id(1, 0));
    // Bursts of 40 flips sent without waiting for their events (the event page holds
    // 63): every flip gets its event, in request order.
    let (bursts, burst) = (15u32, 40u32);
    let flips = bursts * burst;
    let t0 = Instant::now();
    let mut answered = Duration::ZERO;
    for b in 0..bursts {
        let t = Instant::now();
        for f in b * burst + 1..=(b + 1) * burst {
            fe.page_flip(0, bufs[(f % 2) as usize].1).unwrap();
        }
        answered += t.elapsed();
        for f in b * burst + 1..=(b + 1) * burst {
            fe.wait_flip_event(0, bufs[(f % 2) as usize].1, FLIP_WAIT)
                .unwrap_or_else(|e| panic!("flip {f}: {e}"));
        }
    }
    let elapsed = t0.elapsed();
    let shown = rig.view.frames_shown(conn_id(1, 0)) - shown_before;
    let refreshes = (elapsed.as_secs_f64() * 60.0).ceil() as u64 + 2;
    assert!(
        shown <= refreshes,
        "{shown} frames shown (copied) in {elapsed:?}: more than one per refresh ({refreshes})"
    );
    assert!(shown >= 1);
    // Flip 600 is the last: buffer 0, drawn with frame 10.
    assert_image(&rig.frame(1, 0), &expected(XR24, 10, 0, 320, 240), 320, 240);
    eprintln!("{flips} flips answered in {answered:?}; {shown} frames copied in {elapsed:?}");
}

fn conn_id(dom: u16, idx: u32) -> displback::output::ConnectorId {
    displback::output::ConnectorId {
        dom: DomId(dom),
        dev: 0,
        idx,
    }
}

#[test]
fn per_guest_budgets_refuse_with_enomem_and_are_shared_by_the_guests_devices() {
    let limits = Limits {
        max_buffers: 3,
        max_fbs: 2,
        ..Limits::default()
    };
    let mut rig = Rig::with_limits(limits);
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let a = fe.create_dumb(64, 64, 32).unwrap();
    let b = fe.create_dumb(64, 64, 32).unwrap();
    // A second device of the same domain shares its budget.
    rig.toolstack
        .add_vdispl(
            BACKEND,
            DomId(1),
            1,
            false,
            &[("Virtual-2".to_string(), 64, 64)],
        )
        .unwrap();
    let xs = XsClient::from_stream(rig.xenstored.connect(1).unwrap()).unwrap();
    let mut fe2 = FrontendSim::new(&rig.sim, xs, DomId(1), 1).unwrap();
    fe2.wait_connected(WAIT).unwrap();
    let c = fe2.create_dumb(64, 64, 32).unwrap();
    assert_eq!(status_of(fe2.create_dumb(64, 64, 32)), -libc::ENOMEM);
    assert_eq!(status_of(fe.create_dumb(64, 64, 32)), -libc::ENOMEM);
    // Another guest is not affected.
    let mut other = rig.guest(2, &[("Virtual-3", 64, 64)]);
    let _o = buffers(&mut other, 2, 64, 64, XR24);
    // Framebuffers.
    fe.attach_fb(&a, 64, 64, XR24.fourcc()).unwrap();
    fe.attach_fb(&b, 64, 64, XR24.fourcc()).unwrap();
    assert_eq!(
        status_of(fe2.attach_fb(&c, 64, 64, XR24.fourcc())),
        -libc::ENOMEM
    );
    // Giving back makes room again.
    assert_eq!(fe.destroy_dumb(a).unwrap().status, 0);
    fe.create_dumb(64, 64, 32).unwrap();
    fe2.attach_fb(&c, 64, 64, XR24.fourcc()).unwrap();
}

#[test]
fn grant_mapping_and_byte_budgets_refuse_with_enomem() {
    let limits = Limits {
        // One 320x240 XRGB8888 buffer is 75 pages.
        max_grant_mappings: 100,
        max_total_bytes: 1 << 20,
        ..Limits::default()
    };
    let mut rig = Rig::with_limits(limits);
    let mut fe = rig.guest(1, &[("Virtual-1", 320, 240)]);
    let first = fe.create_dumb(320, 240, 32).unwrap();
    assert_eq!(status_of(fe.create_dumb(320, 240, 32)), -libc::ENOMEM);
    fe.destroy_dumb(first).unwrap();
    // 1 MiB of bytes: 512x512@32 is exactly 1 MiB (256 pages, over the mapping budget),
    // so check bytes with a budget of its own.
    let limits = Limits {
        max_total_bytes: 300 * 1024,
        ..Limits::default()
    };
    let mut rig = Rig::with_limits(limits);
    let mut fe = rig.guest(1, &[("Virtual-1", 320, 240)]);
    let _first = fe.create_dumb(320, 240, 32).unwrap();
    assert_eq!(status_of(fe.create_dumb(64, 64, 32)), -libc::ENOMEM);
}

#[test]
fn be_alloc_pages_the_guest_still_maps_stay_charged_until_it_unmaps() {
    // 64xH XRGB8888 is H/16 pages: 4 + 3 + 2 pages fill the budget.
    let limits = Limits {
        max_total_bytes: 9 * 4096,
        ..Limits::default()
    };
    let mut rig = Rig::with_limits(limits);
    let mut fe = rig.guest_with(1, true, &[("Virtual-1", 64, 64)]);
    // A hostile guest: DBUF_DESTROY but keep the backend's pages mapped. Different
    // sizes, so no retained pages can be reused.
    let mut kept = Vec::new();
    for h in [64u32, 48, 32] {
        let buf = fe.create_dumb_be_alloc(64, h, 32).unwrap();
        let r = fe
            .request(
                0,
                Request::DbufDestroy {
                    dbuf_cookie: buf.cookie,
                },
            )
            .unwrap();
        assert_eq!(r.status, 0);
        kept.push(buf);
    }
    // Destroyed but still mapped: still charged.
    assert_eq!(
        status_of(fe.create_dumb_be_alloc(64, 16, 32)),
        -libc::ENOMEM
    );
    // Reusing a retained buffer of the same size costs nothing new, and it is zeroed.
    kept[0].region().write(0, &[0xaa; 64]).unwrap();
    let again = fe.create_dumb_be_alloc(64, 64, 32).unwrap();
    let mut head = [0xffu8; 64];
    again.region().read(0, &mut head).unwrap();
    assert_eq!(head, [0u8; 64], "reused be-alloc pages must be zeroed");
    assert_eq!(fe.destroy_dumb(again).unwrap().status, 0);
    // The guest unmaps: the pages leave its budget.
    drop(kept);
    for h in [48u32, 32] {
        fe.create_dumb_be_alloc(64, h, 32).unwrap();
    }
}

#[test]
fn req_alloc_is_refused_without_be_alloc() {
    let mut rig = Rig::new();
    let mut fe = rig.guest_with(1, false, &[("Virtual-1", 64, 64)]);
    assert_eq!(
        status_of(fe.create_dumb_be_alloc(64, 64, 32)),
        -libc::EINVAL
    );
    // The guest's ordinary buffers still work.
    show_and_flip(&rig, &mut fe, 1, 0, (64, 64), 2);
}

#[test]
fn set_config_past_its_rate_is_refused_with_ebusy() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let bufs = buffers(&mut fe, 1, 64, 64, XR24);
    let statuses: Vec<i32> = (0..12)
        .map(|_| status_of(fe.set_config(0, bufs[0].1, 64, 64, 32)))
        .collect();
    assert!(statuses[..8].iter().all(|&s| s == 0), "{statuses:?}");
    assert!(statuses.contains(&-libc::EBUSY), "{statuses:?}");
}

#[test]
fn a_ring_overflow_holds_the_device_closed_before_it_may_reconnect() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    let good = rig.guest(2, &[("Virtual-2", 64, 64)]);
    fe.flood(0, 40).unwrap();
    rig.wait_node("/local/domain/0/backend/vdispl/1/0/state", "6");
    let t0 = Instant::now();
    fe.restart().unwrap();
    fe.wait_connected(WAIT).unwrap();
    let held = t0.elapsed();
    assert!(
        held >= Duration::from_millis(900),
        "reconnected after {held:?}"
    );
    // It works again afterwards, and the other guest never noticed.
    show_and_flip(&rig, &mut fe, 1, 0, (64, 64), 2);
    let mut good = good;
    show_and_flip(&rig, &mut good, 2, 0, (64, 64), 2);
}

#[test]
fn vdispl_detach_then_attach_of_the_same_id_works() {
    let mut rig = Rig::new();
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    show_and_flip(&rig, &mut fe, 1, 0, (64, 64), 2);
    assert!(rig.toolstack.remove_vdispl(BACKEND, DomId(1), 0).unwrap());
    drop(fe);
    // The same device id again: the backend must drop the old device and serve the new.
    let mut fe = rig.guest(1, &[("Virtual-1", 64, 64)]);
    show_and_flip(&rig, &mut fe, 1, 0, (64, 64), 3);
}

#[test]
fn a_display_attached_to_a_running_guest_without_one_works() {
    let mut rig = Rig::new();
    rig.toolstack.create_domain(DomId(3), "late").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut fe = rig.guest(3, &[("Virtual-1", 64, 64)]);
    show_and_flip(&rig, &mut fe, 3, 0, (64, 64), 2);
}
