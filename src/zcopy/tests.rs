//! Simulated tests of the release rules, the capability probe and the fallbacks.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::buffer::{BackendAllocError, DestroyError, ZeroCopyBuffer};
use super::gntdev_dmabuf::GntdevDmaBuf;
use super::policy::{Arch, Capabilities, FallbackReason, ZeroCopyGate, ZeroCopyPolicy};
use super::sim::{SimDmaBuf, SimDumb, SimEvent, SimMode, SimScanout};
use super::{DmaBufOps, ExportFlags, ExportedDmaBuf, ImportedDmaBuf};
use crate::backend::{DomId, GrantRef};

const DOM: DomId = DomId(3);

fn refs(n: u32) -> Vec<GrantRef> {
    (10..10 + n).map(GrantRef).collect()
}

fn export(sim: &SimDmaBuf, pages: u32) -> ExportedDmaBuf {
    ExportedDmaBuf::export(Arc::new(sim.clone()), DOM, &refs(pages), ExportFlags::None).unwrap()
}

/// Index of the first event matching `f`, failing the test if there is none.
fn pos(events: &[SimEvent], what: &str, f: impl Fn(&SimEvent) -> bool) -> usize {
    events
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no {what} in {events:#?}"))
}

fn note(s: &str) -> impl Fn(&SimEvent) -> bool + '_ {
    move |e| matches!(e, SimEvent::Note(n) if n == s)
}

#[test]
fn destroy_releases_scanout_then_fd_then_waits() {
    let sim = SimDmaBuf::default();
    let mut buf = ZeroCopyBuffer::new(export(&sim, 4));
    let fd = buf.dmabuf().raw();
    let scanout = SimScanout::import(&sim, buf.dmabuf(), "kms").unwrap();
    scanout.flip();
    buf.add_import(Box::new(scanout));
    // A compositor that lets go 100 ms after the destroy started: the wait must block.
    let compositor = sim.hold(buf.dmabuf(), "compositor").unwrap();
    assert!(buf.on_screen());
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        drop(compositor);
    });
    let start = Instant::now();
    buf.destroy(Duration::from_millis(2000)).unwrap();
    let took = start.elapsed();
    t.join().unwrap();
    assert!(
        took >= Duration::from_millis(90),
        "returned before the release: {took:?}"
    );
    assert_eq!(sim.live_exports(), 0);
    assert_eq!(sim.open_fds(), 0);

    let ev = sim.events();
    let off = pos(&ev, "off-screen", note("kms: off screen"));
    let released = pos(&ev, "hook release", note("kms: released"));
    let gem = pos(
        &ev,
        "GEM drop",
        |e| matches!(e, SimEvent::HolderDropped { what } if what == "kms"),
    );
    let closed = pos(&ev, "fd close", |e| *e == SimEvent::FdClosed { fd });
    let wait = pos(&ev, "wait", |e| *e == SimEvent::WaitStarted { fd });
    let comp = pos(
        &ev,
        "compositor drop",
        |e| matches!(e, SimEvent::HolderDropped { what } if what == "compositor"),
    );
    let gone = pos(&ev, "release", |e| *e == SimEvent::Released { fd });
    let ended = pos(&ev, "wait end", |e| {
        *e == SimEvent::WaitEnded { fd, released: true }
    });
    assert!(
        off < released && released < gem && gem < closed && closed < wait,
        "{ev:#?}"
    );
    assert!(wait < comp && comp < gone && gone < ended, "{ev:#?}");
}

#[test]
fn destroy_without_other_holders_needs_no_wait() {
    let sim = SimDmaBuf::default();
    let mut buf = ZeroCopyBuffer::new(export(&sim, 1));
    let scanout = SimScanout::import(&sim, buf.dmabuf(), "kms").unwrap();
    buf.add_import(Box::new(scanout));
    let start = Instant::now();
    buf.destroy(Duration::from_millis(2000)).unwrap();
    assert!(start.elapsed() < Duration::from_millis(500));
    let ev = sim.events();
    // Released when our fd closed: the wait found nothing (gntdev's ENOENT).
    assert!(
        !ev.iter().any(|e| matches!(e, SimEvent::WaitStarted { .. })),
        "{ev:#?}"
    );
    assert_eq!(sim.live_exports(), 0);
}

#[test]
fn destroy_times_out_while_an_importer_holds_it() {
    let sim = SimDmaBuf::default();
    let mut buf = ZeroCopyBuffer::new(export(&sim, 2));
    buf.add_import(Box::new(
        SimScanout::import(&sim, buf.dmabuf(), "kms").unwrap(),
    ));
    let compositor = sim.hold(buf.dmabuf(), "compositor").unwrap();
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    let err = buf.destroy(timeout).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, DestroyError::TimedOut { .. }), "{err:?}");
    assert_eq!(err.status(), -libc::ETIMEDOUT);
    assert!(took >= timeout, "gave up early: {took:?}");
    assert!(
        took < timeout + Duration::from_millis(300),
        "overran: {took:?}"
    );
    // Honest: the grants are still mapped until the compositor lets go.
    assert_eq!(sim.live_exports(), 1);
    drop(compositor);
    assert_eq!(sim.live_exports(), 0);
}

#[test]
fn destroy_is_busy_when_the_scanout_cannot_be_stopped() {
    let sim = SimDmaBuf::default();
    let mut buf = ZeroCopyBuffer::new(export(&sim, 2));
    let mut scanout = SimScanout::import(&sim, buf.dmabuf(), "kms").unwrap();
    scanout.fail_off_screen = true;
    scanout.flip();
    buf.add_import(Box::new(scanout));
    // The stuck CRTC keeps reading it (modelled as a reference that stays).
    let crtc = sim.hold(buf.dmabuf(), "crtc").unwrap();
    let err = buf.destroy(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, DestroyError::Busy { .. }), "{err:?}");
    assert_eq!(err.status(), -libc::EBUSY);
    drop(crtc);
}

#[test]
fn dropping_a_buffer_releases_imports_then_the_fd() {
    let sim = SimDmaBuf::default();
    let mut buf = ZeroCopyBuffer::new(export(&sim, 2));
    let fd = buf.dmabuf().raw();
    buf.add_import(Box::new(
        SimScanout::import(&sim, buf.dmabuf(), "kms").unwrap(),
    ));
    drop(buf);
    let ev = sim.events();
    let released = pos(&ev, "hook release", note("kms: released"));
    let closed = pos(&ev, "fd close", |e| *e == SimEvent::FdClosed { fd });
    assert!(released < closed, "{ev:#?}");
    assert_eq!(sim.live_exports(), 0);
    assert_eq!(sim.open_fds(), 0);
}

#[test]
fn a_timed_out_export_keeps_its_fd_number_reserved() {
    // gntdev finds exports by fd number. If the number of a stale export (its wait timed
    // out) were reused by a new export, the new buffer's wait would find... the stale one
    // once the new one is released, and time out although its own grants are unmapped.
    let sim = SimDmaBuf::default();
    let a = export(&sim, 1);
    let a_fd = a.exported_as();
    let holder = sim.hold(a.fd(), "compositor").unwrap();
    let err = a.wait_released(Duration::from_millis(10)).unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(sim.reserved_numbers(), 1);
    let b = export(&sim, 1);
    assert_ne!(b.exported_as(), a_fd, "a's number is still reserved");
    let start = Instant::now();
    b.wait_released(Duration::from_millis(1000)).unwrap();
    assert!(start.elapsed() < Duration::from_millis(500));
    assert_eq!(sim.live_exports(), 1, "a is still held");
    drop(holder);
    assert_eq!(sim.live_exports(), 0);
    assert_eq!(sim.reserved_numbers(), 0);
    let c = export(&sim, 1);
    assert_eq!(
        c.exported_as(),
        a_fd,
        "released numbers are reused lowest-first"
    );
}

#[test]
fn probe_tells_missing_from_present() {
    let ok = Capabilities::probe(&SimDmaBuf::default(), Some("HVM\n"), Arch::Other);
    assert_eq!(ok.export, Ok(()));
    assert_eq!(ok.import, Ok(()));
    assert_eq!(ok.guest_type.as_deref(), Some("HVM"));

    let pv = Capabilities::probe(&SimDmaBuf::new(SimMode::PteMod), Some("PV"), Arch::X86);
    assert_eq!(pv.export, Err(FallbackReason::PvDomain));
    assert_eq!(pv.import, Err(FallbackReason::PvImport));

    // x86 HVM/PVH: exports need a device mapping Xen refuses; be-alloc imports work.
    let pvh = Capabilities::probe(&SimDmaBuf::default(), Some("PVH"), Arch::X86);
    assert_eq!(pvh.export, Err(FallbackReason::X86DeviceMap));
    assert_eq!(pvh.import, Ok(()));
    let arm = Capabilities::probe(&SimDmaBuf::default(), None, Arch::Other);
    assert_eq!((arm.export, arm.import), (Ok(()), Ok(())));

    for errno in [libc::ENOTTY, libc::ENOSYS] {
        let caps = Capabilities::probe(&SimDmaBuf::new(SimMode::Missing(errno)), None, Arch::X86);
        assert_eq!(caps.export, Err(FallbackReason::NoDmaBuf(errno)));
        assert_eq!(caps.import, Err(FallbackReason::NoDmaBuf(errno)));
    }

    // The real ioctl on a file without them: ENOTTY.
    let null = GntdevDmaBuf::open(Path::new("/dev/null")).unwrap();
    let caps = Capabilities::probe(&null, None, Arch::X86);
    assert_eq!(caps.export, Err(FallbackReason::NoDmaBuf(libc::ENOTTY)));
}

fn gate(sim: &SimDmaBuf, policy: ZeroCopyPolicy, guest_type: Option<&str>) -> ZeroCopyGate {
    let caps = Capabilities::probe(sim, guest_type, Arch::Other);
    ZeroCopyGate::new(policy, Some(Arc::new(sim.clone())), &caps).unwrap()
}

#[test]
fn auto_falls_back_on_einval_for_every_later_buffer_and_logs_once() {
    // PV domain whose guest_type is unknown: the probe passes, the first export fails.
    let sim = SimDmaBuf::new(SimMode::PteMod);
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    assert!(g.export_disabled().is_none());
    for _ in 0..3 {
        assert!(g.export(DOM, &refs(4)).unwrap().is_none());
    }
    assert_eq!(sim.export_calls(), 1, "later buffers must not retry");
    assert_eq!(g.export_disabled(), Some(&FallbackReason::PvDomain));
    // Learned PV: be-alloc imports are off from then on too (one line each).
    assert_eq!(g.import_disabled(), Some(&FallbackReason::PvImport));
    assert_eq!(g.fallback_logs(), 2);
}

#[test]
fn auto_treats_einval_as_bad_grants_once_exports_are_known_to_work() {
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    let good = g.export(DOM, &refs(2)).unwrap().expect("zero-copy");
    for _ in 0..3 {
        let bad = [GrantRef(5), GrantRef(0)];
        assert!(g.export(DOM, &bad).unwrap().is_none());
    }
    assert!(
        g.export_disabled().is_none(),
        "one guest's bad refs must not switch it off"
    );
    assert_eq!(g.fallback_logs(), 1);
    assert!(g.export(DOM, &refs(2)).unwrap().is_some());
    drop(good);
}

#[test]
fn auto_in_a_known_hvm_domain_never_blames_the_domain() {
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, Some("PVH"));
    assert!(g.export(DOM, &[GrantRef(0)]).unwrap().is_none());
    assert!(g.export_disabled().is_none());
    assert!(g.export(DOM, &refs(1)).unwrap().is_some());
}

#[test]
fn auto_without_dmabuf_support_never_calls_export() {
    let sim = SimDmaBuf::new(SimMode::Missing(libc::ENOTTY));
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    assert_eq!(g.fallback_logs(), 1);
    assert!(g.export(DOM, &refs(1)).unwrap().is_none());
    assert!(g.export(DOM, &refs(1)).unwrap().is_none());
    assert_eq!(sim.export_calls(), 0);
    assert_eq!(g.fallback_logs(), 1);
}

#[test]
fn on_fails_the_request_with_the_errno() {
    let sim = SimDmaBuf::new(SimMode::PteMod);
    let mut g = gate(&sim, ZeroCopyPolicy::On, None);
    for n in 1..=2 {
        let e = g.export(DOM, &refs(1)).unwrap_err();
        assert_eq!(e.raw_errno(), libc::EINVAL);
        assert_eq!(sim.export_calls(), n);
    }
    // And refuses to start where the probe already says no.
    let missing = SimDmaBuf::new(SimMode::Missing(libc::ENOTTY));
    let caps = Capabilities::probe(&missing, None, Arch::X86);
    let r = ZeroCopyGate::new(ZeroCopyPolicy::On, Some(Arc::new(missing)), &caps);
    assert_eq!(r.unwrap_err(), FallbackReason::NoDmaBuf(libc::ENOTTY));
    let pv = SimDmaBuf::default();
    let caps = Capabilities::probe(&pv, Some("PV"), Arch::X86);
    assert!(ZeroCopyGate::new(ZeroCopyPolicy::On, Some(Arc::new(pv)), &caps).is_err());
}

#[test]
fn off_never_calls_export() {
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Off, Some("HVM"));
    assert!(g.export(DOM, &refs(3)).unwrap().is_none());
    assert!(g
        .backend_alloc(DOM, 1, 4096, || unreachable!("off must not allocate"))
        .unwrap()
        .is_none());
    assert_eq!(sim.export_calls(), 0);
    assert_eq!(g.fallback_logs(), 0);
    assert!(ZeroCopyGate::off().export(DOM, &refs(1)).unwrap().is_none());
}

#[test]
fn backend_alloc_grants_a_dumb_buffer_and_tears_down_in_order() {
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    // 1024x768 XRGB8888: pitch 4096, 768 pages.
    let dumb = SimDumb::new(&sim, 768 * 4096, 4096, "dumb");
    let buf = g
        .backend_alloc(DOM, 768, 4096, || Ok(Box::new(dumb)))
        .unwrap()
        .expect("zero-copy be-alloc");
    assert_eq!(buf.refs().len(), 768);
    assert!(buf.refs().iter().all(|r| r.0 != 0));
    assert_eq!(sim.live_imports(), 1);
    buf.destroy().unwrap();
    assert_eq!(sim.live_imports(), 0);
    assert_eq!(sim.open_fds(), 0);
    let ev = sim.events();
    let rel = pos(&ev, "IMP_RELEASE", |e| {
        matches!(e, SimEvent::ImportReleased { .. })
    });
    let closed = pos(&ev, "fd close", |e| matches!(e, SimEvent::FdClosed { .. }));
    let freed = pos(&ev, "dumb free", note("dumb: freed"));
    assert!(rel < closed && closed < freed, "{ev:#?}");
}

#[test]
fn backend_alloc_falls_back_when_the_driver_pads_lines() {
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    // 1366 px at 32 bpp: the guest expects pitch 5464; a driver aligning to 64 gives 5504.
    let mk = || Ok(Box::new(SimDumb::new(&sim, 1344 * 4096, 5504, "dumb")) as _);
    assert!(g.backend_alloc(DOM, 1334, 5464, mk).unwrap().is_none());
    assert!(g.import_disabled().is_none(), "geometry is per buffer");
    assert_eq!(g.fallback_logs(), 1);
    assert_eq!(sim.open_fds(), 0);

    let mut on = gate(&sim, ZeroCopyPolicy::On, None);
    let mk = || Ok(Box::new(SimDumb::new(&sim, 1344 * 4096, 5504, "dumb")) as _);
    let e = on.backend_alloc(DOM, 1334, 5464, mk).unwrap_err();
    assert!(matches!(e, BackendAllocError::Geometry { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EINVAL);
}

#[test]
fn backend_alloc_without_dmabuf_uses_gntalloc() {
    let sim = SimDmaBuf::new(SimMode::Missing(libc::ENOTTY));
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    assert!(g.import_disabled().is_some());
    let r = g.backend_alloc(DOM, 1, 4096, || unreachable!("no dma-buf: no dumb buffer"));
    assert!(r.unwrap().is_none());

    // Import failing with ENOTTY at run time switches be-alloc off for later buffers.
    let sim = SimDmaBuf::default();
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, None);
    sim.set_mode(SimMode::Missing(libc::ENOTTY));
    let mk = || Ok(Box::new(SimDumb::new(&sim, 4096, 4096, "dumb")) as _);
    assert!(g.backend_alloc(DOM, 1, 4096, mk).unwrap().is_none());
    assert_eq!(
        g.import_disabled(),
        Some(&FallbackReason::NoDmaBuf(libc::ENOTTY))
    );
    assert_eq!(sim.open_fds(), 0, "the PRIME fd was closed");
}

#[test]
fn backend_alloc_in_a_pv_domain_uses_gntalloc() {
    // IMP_TO_REFS works there, but may grant swiotlb bounce slots (FallbackReason::PvImport).
    let sim = SimDmaBuf::new(SimMode::PteMod);
    let mut g = gate(&sim, ZeroCopyPolicy::Auto, Some("PV"));
    assert_eq!(g.import_disabled(), Some(&FallbackReason::PvImport));
    let r = g.backend_alloc(DOM, 1, 4096, || {
        unreachable!("PV: no dumb buffer to import")
    });
    assert!(r.unwrap().is_none());
    assert_eq!(sim.live_imports(), 0);
}

#[test]
fn imported_buffer_releases_on_drop_before_closing() {
    let sim = SimDmaBuf::default();
    let ops: Arc<dyn DmaBufOps> = Arc::new(sim.clone());
    let fd = sim.foreign_buffer(3 * 4096);
    let raw = fd.raw();
    assert!(ImportedDmaBuf::import(ops.clone(), sim.foreign_buffer(4096), DOM, 2).is_err());
    let imp = ImportedDmaBuf::import(ops, fd, DOM, 3).unwrap();
    assert_eq!(imp.refs().len(), 3);
    drop(imp);
    let ev = sim.events();
    let rel = pos(&ev, "IMP_RELEASE", |e| {
        *e == SimEvent::ImportReleased { fd: raw }
    });
    let closed = pos(&ev, "close", |e| *e == SimEvent::FdClosed { fd: raw });
    assert!(rel < closed);
    assert_eq!(sim.live_imports(), 0);
    assert_eq!(sim.open_fds(), 0);
}
