//! vkbd (kbdif) end to end on the simulated Xen: the handshake with a frontend that
//! behaves like xen-kbdfront, every event type with scaled coordinates and contact slots,
//! a ring the guest never consumes, and hostile frontends (bad page ref, garbage
//! indices, state games) that are refused while other guests go on.

mod common;

use std::time::Duration;

use common::{Rig, BACKEND, WAIT};
use displback::backend::server::{InputTarget, ServerConfig};
use displback::kbdif::device::{Input, NORM_MAX};
use displback::kbdif::wire::{InEvent, IN_RING_LEN, RAW_MAX};
use displback::sim::kbdfront::{KbdFrontOptions, KbdFrontSim};
use displback::xen::xenstore::{Tx, XsClient};
use displback::xen::{DomId, XenbusState};

/// xl.cfg `vkb = [ 'unique-id=T:<dom>,multi-touch-width=1920,multi-touch-height=1080,
/// multi-touch-num-contacts=10,width=1024,height=768' ]`.
fn touch_params(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("unique-id", id.to_string()),
        ("multi-touch-width", "1920".into()),
        ("multi-touch-height", "1080".into()),
        ("multi-touch-num-contacts", "10".into()),
        ("width", "1024".into()),
        ("height", "768".into()),
    ]
}

fn add_vkbd(rig: &mut Rig, dom: u16, params: &[(&'static str, String)]) {
    rig.toolstack
        .create_domain(DomId(dom), &format!("guest{dom}"))
        .unwrap();
    let p: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    rig.toolstack.add_vkbd(BACKEND, DomId(dom), 0, &p).unwrap();
}

fn front(rig: &Rig, dom: u16, opts: KbdFrontOptions) -> KbdFrontSim {
    let xs = XsClient::from_stream(rig.xenstored.connect(dom).unwrap()).unwrap();
    KbdFrontSim::new(&rig.sim, xs, DomId(dom), 0, opts).unwrap()
}

fn connected(rig: &Rig, dom: u16, opts: KbdFrontOptions) -> KbdFrontSim {
    let mut fe = front(rig, dom, opts);
    fe.wait_connected(WAIT).unwrap();
    fe
}

fn send(rig: &Rig, dom: u16, input: Vec<Input>) {
    assert!(rig
        .input
        .as_ref()
        .unwrap()
        .send(InputTarget::Device(DomId(dom), 0), input));
}

fn backend_state(rig: &mut Rig, dom: u16) -> XenbusState {
    let path = format!("/local/domain/0/backend/vinput/{dom}/0/state");
    rig.toolstack
        .xs()
        .read(Tx::NONE, &path)
        .unwrap()
        .map_or(XenbusState::Unknown, |s| XenbusState::parse(&s))
}

fn key(code: u32, pressed: bool) -> InEvent {
    InEvent::Key {
        pressed,
        keycode: code,
    }
}

const KEY_A: u32 = 30;
const KEY_LEFTSHIFT: u32 = 42;
const KEY_LEFTCTRL: u32 = 29;
const BTN_LEFT: u32 = 0x110;
const BTN_TOUCH: u32 = 0x14a;

#[test]
fn handshake_features_and_requests() {
    let mut rig = Rig::new();
    add_vkbd(&mut rig, 5, &touch_params("T:1000"));
    let fe = connected(&rig, 5, KbdFrontOptions::default());
    // What the backend advertised, as the frontend read it at probe.
    let c = &fe.config;
    assert!(c.abs && c.mt);
    assert_eq!((c.width, c.height), (1024, 768));
    assert_eq!((c.mt_width, c.mt_height, c.mt_contacts), (1920, 1080, 10));
    assert_eq!(c.unique_id.as_deref(), Some("T:1000"));
    let xs = rig.toolstack.xs();
    let be = "/local/domain/0/backend/vinput/5/0";
    for (node, want) in [
        ("feature-abs-pointer", "1"),
        ("feature-raw-pointer", "1"),
        ("feature-multi-touch", "1"),
        ("state", "4"),
    ] {
        assert_eq!(
            xs.read(Tx::NONE, &format!("{be}/{node}"))
                .unwrap()
                .as_deref(),
            Some(want),
            "{node}"
        );
    }
}

#[test]
fn every_event_type_scaled_with_slots() {
    let mut rig = Rig::new();
    add_vkbd(&mut rig, 5, &touch_params("T:1000"));
    let mut fe = connected(&rig, 5, KbdFrontOptions::default());
    let n = NORM_MAX;
    send(
        &rig,
        5,
        vec![
            // Ctrl+Shift+A.
            Input::Key {
                code: KEY_LEFTCTRL,
                pressed: true,
            },
            Input::Key {
                code: KEY_LEFTSHIFT,
                pressed: true,
            },
            Input::Key {
                code: KEY_A,
                pressed: true,
            },
            Input::Key {
                code: KEY_A,
                pressed: false,
            },
            Input::Key {
                code: KEY_LEFTSHIFT,
                pressed: false,
            },
            Input::Key {
                code: KEY_LEFTCTRL,
                pressed: false,
            },
            // Absolute pointer at the corners, wheel, a button.
            Input::Abs {
                x: 0,
                y: 0,
                wheel: 0,
            },
            Input::Abs {
                x: n,
                y: n,
                wheel: -1,
            },
            Input::Key {
                code: BTN_LEFT,
                pressed: true,
            },
            Input::Key {
                code: BTN_LEFT,
                pressed: false,
            },
            // Two fingers: down, move, up, with frames.
            Input::TouchDown {
                slot: 0,
                x: 0,
                y: 0,
            },
            Input::TouchDown {
                slot: 1,
                x: n,
                y: n,
            },
            Input::TouchFrame,
            Input::TouchMove {
                slot: 0,
                x: n / 2 + 1,
                y: n / 2 + 1,
            },
            Input::TouchMove {
                slot: 1,
                x: n / 4 + 1,
                y: n,
            },
            Input::TouchFrame,
            Input::TouchUp { slot: 0 },
            Input::TouchUp { slot: 1 },
            Input::TouchFrame,
        ],
    );
    let got = fe.wait_events(19, WAIT).unwrap();
    let want = vec![
        key(KEY_LEFTCTRL, true),
        key(KEY_LEFTSHIFT, true),
        key(KEY_A, true),
        key(KEY_A, false),
        key(KEY_LEFTSHIFT, false),
        key(KEY_LEFTCTRL, false),
        InEvent::Position {
            abs_x: 0,
            abs_y: 0,
            rel_z: 0,
        },
        InEvent::Position {
            abs_x: 1024,
            abs_y: 768,
            rel_z: -1,
        },
        key(BTN_LEFT, true),
        key(BTN_LEFT, false),
        InEvent::TouchDown {
            contact: 0,
            x: 0,
            y: 0,
        },
        InEvent::TouchDown {
            contact: 1,
            x: 1920,
            y: 1080,
        },
        InEvent::TouchFrame { contact: 1 },
        InEvent::TouchMotion {
            contact: 0,
            x: 960,
            y: 540,
        },
        InEvent::TouchMotion {
            contact: 1,
            x: 480,
            y: 1080,
        },
        InEvent::TouchFrame { contact: 1 },
        InEvent::TouchUp { contact: 0 },
        InEvent::TouchUp { contact: 1 },
        InEvent::TouchFrame { contact: 1 },
    ];
    assert_eq!(got, want);
    // Relative motion is not what an absolute-pointer guest takes (filtered), a wheel
    // alone is; a contact beyond the configured 10, or a lift of a contact that is not
    // down, is filtered too.
    send(
        &rig,
        5,
        vec![
            Input::Motion {
                dx: 5,
                dy: -3,
                wheel: 0,
            },
            Input::Motion {
                dx: 0,
                dy: 0,
                wheel: 2,
            },
            Input::TouchDown {
                slot: 10,
                x: 1,
                y: 1,
            },
            Input::TouchUp { slot: 3 },
            Input::Key {
                code: BTN_TOUCH + 0x1000,
                pressed: true,
            },
            Input::Key {
                code: KEY_A,
                pressed: true,
            },
        ],
    );
    let got = fe.wait_events(2, WAIT).unwrap();
    assert_eq!(
        got,
        vec![
            InEvent::Motion {
                rel_x: 0,
                rel_y: 0,
                rel_z: 2
            },
            key(KEY_A, true)
        ]
    );
}

#[test]
fn relative_pointer_raw_pointer_and_disabled_keyboard() {
    let mut rig = Rig::new();
    // No multi-touch, keyboard disabled: keys are filtered, buttons go through.
    add_vkbd(
        &mut rig,
        6,
        &[("feature-disable-keyboard", "1".to_string())],
    );
    let mut fe = connected(
        &rig,
        6,
        KbdFrontOptions {
            request_raw: true,
            ..Default::default()
        },
    );
    assert!(fe.config.raw && !fe.config.mt && fe.config.disable_keyboard);
    send(
        &rig,
        6,
        vec![
            Input::Key {
                code: KEY_A,
                pressed: true,
            },
            Input::Key {
                code: BTN_LEFT,
                pressed: true,
            },
            Input::Abs {
                x: NORM_MAX,
                y: 0,
                wheel: 0,
            },
            Input::TouchDown {
                slot: 0,
                x: 0,
                y: 0,
            },
            Input::Key {
                code: BTN_LEFT,
                pressed: false,
            },
        ],
    );
    let got = fe.wait_events(3, WAIT).unwrap();
    assert_eq!(
        got,
        vec![
            key(BTN_LEFT, true),
            InEvent::Position {
                abs_x: RAW_MAX as i32,
                abs_y: 0,
                rel_z: 0
            },
            key(BTN_LEFT, false),
        ]
    );
    // A guest that did not ask for absolute coordinates gets relative motion only.
    add_vkbd(&mut rig, 7, &[]);
    rig.toolstack
        .xs()
        .write(
            Tx::NONE,
            "/local/domain/0/backend/vinput/7/0/feature-abs-pointer",
            "0",
        )
        .unwrap();
    // (The backend advertised before InitWait; the toolstack took it back before the
    // frontend probed, so this frontend does not request absolute coordinates.)
    let mut fe7 = connected(&rig, 7, KbdFrontOptions::default());
    assert!(!fe7.config.abs);
    send(
        &rig,
        7,
        vec![
            Input::Abs {
                x: 0,
                y: 0,
                wheel: 0,
            },
            Input::Motion {
                dx: 4,
                dy: -2,
                wheel: 1,
            },
        ],
    );
    assert_eq!(
        fe7.wait_events(1, WAIT).unwrap(),
        vec![InEvent::Motion {
            rel_x: 4,
            rel_y: -2,
            rel_z: 1
        }]
    );
}

#[test]
fn a_guest_that_never_consumes_loses_events_and_others_go_on() {
    let mut rig = Rig::new();
    add_vkbd(&mut rig, 5, &touch_params("T:5"));
    add_vkbd(&mut rig, 6, &touch_params("T:6"));
    let mut stuck = connected(
        &rig,
        5,
        KbdFrontOptions {
            never_consume: true,
            ..Default::default()
        },
    );
    let mut fine = connected(&rig, 6, KbdFrontOptions::default());
    let burst: Vec<Input> = (0..200)
        .map(|k| Input::Key {
            code: 2 + (k % 10),
            pressed: k % 2 == 0,
        })
        .collect();
    send(&rig, 5, burst.clone());
    send(
        &rig,
        6,
        vec![Input::Key {
            code: KEY_A,
            pressed: true,
        }],
    );
    assert_eq!(fine.wait_events(1, WAIT).unwrap(), vec![key(KEY_A, true)]);
    stuck.pump(Duration::from_millis(200)).unwrap();
    assert_eq!(
        stuck.pending(),
        IN_RING_LEN,
        "the ring is full, the rest was lost"
    );
    assert_eq!(backend_state(&mut rig, 5), XenbusState::Connected);
    // Once it consumes, new input flows again (the lost events stay lost).
    stuck.set_consume(true);
    let first = stuck.wait_events(IN_RING_LEN as usize, WAIT).unwrap();
    assert_eq!(first.len(), IN_RING_LEN as usize);
    send(
        &rig,
        5,
        vec![Input::Key {
            code: KEY_A,
            pressed: false,
        }],
    );
    assert_eq!(stuck.wait_events(1, WAIT).unwrap(), vec![key(KEY_A, false)]);
}

#[test]
fn hostile_frontends_are_refused_and_others_unaffected() {
    let mut rig = Rig::new();
    add_vkbd(&mut rig, 5, &touch_params("T:5"));
    add_vkbd(&mut rig, 6, &touch_params("T:6"));
    add_vkbd(&mut rig, 7, &touch_params("T:7"));
    let mut good = connected(&rig, 5, KbdFrontOptions::default());

    // A page ref that was never granted: the backend cannot map it and refuses.
    let mut bad = front(
        &rig,
        6,
        KbdFrontOptions {
            bad_gref: Some(0xdead),
            ..Default::default()
        },
    );
    assert!(bad
        .pump_until(WAIT, |f| f.backend_state() == XenbusState::Closed)
        .unwrap());

    // Garbage consumer index: the next delivery finds the ring broken and closes it.
    let mut garbage = connected(
        &rig,
        7,
        KbdFrontOptions {
            never_consume: true,
            ..Default::default()
        },
    );
    garbage.set_cons(0x8000_0000);
    send(
        &rig,
        7,
        vec![Input::Key {
            code: KEY_A,
            pressed: true,
        }],
    );
    assert!(garbage
        .pump_until(WAIT, |f| f.backend_state() == XenbusState::Closed)
        .unwrap());

    // State games from the good guest's neighbours do not touch it.
    for s in [
        XenbusState::Initialising,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Initialised,
        XenbusState::Unknown,
    ] {
        bad.force_state(s).unwrap();
        garbage.force_state(s).unwrap();
    }
    send(
        &rig,
        5,
        vec![Input::TouchDown {
            slot: 9,
            x: NORM_MAX,
            y: 0,
        }],
    );
    assert_eq!(
        good.wait_events(1, WAIT).unwrap(),
        vec![InEvent::TouchDown {
            contact: 9,
            x: 1920,
            y: 0
        }]
    );
    assert_eq!(backend_state(&mut rig, 5), XenbusState::Connected);
}

#[test]
fn release_all_lifts_contacts_and_keys_and_unique_id_targets() {
    let mut rig = Rig::new();
    add_vkbd(&mut rig, 5, &touch_params("T:1000"));
    let mut fe = connected(&rig, 5, KbdFrontOptions::default());
    let h = rig.input.clone().unwrap();
    assert!(h.send(
        InputTarget::UniqueId("T:1000".into()),
        vec![
            Input::Key {
                code: KEY_LEFTSHIFT,
                pressed: true
            },
            Input::TouchDown {
                slot: 2,
                x: 0,
                y: 0
            },
            Input::TouchDown {
                slot: 4,
                x: 0,
                y: 0
            },
            Input::TouchFrame,
            Input::ReleaseAll,
        ]
    ));
    let got = fe.wait_events(8, WAIT).unwrap();
    assert_eq!(
        got,
        vec![
            key(KEY_LEFTSHIFT, true),
            InEvent::TouchDown {
                contact: 2,
                x: 0,
                y: 0
            },
            InEvent::TouchDown {
                contact: 4,
                x: 0,
                y: 0
            },
            InEvent::TouchFrame { contact: 4 },
            InEvent::TouchUp { contact: 2 },
            InEvent::TouchUp { contact: 4 },
            InEvent::TouchFrame { contact: 4 },
            key(KEY_LEFTSHIFT, false),
        ]
    );
    // Another unique-id reaches nobody here.
    assert!(h.send(
        InputTarget::UniqueId("T:9".into()),
        vec![Input::Key {
            code: KEY_A,
            pressed: true
        }]
    ));
    fe.pump(Duration::from_millis(200)).unwrap();
    assert!(fe.events.is_empty());
}

#[test]
fn no_input_leaves_vkbd_devices_alone() {
    let mut rig = Rig::unstarted(ServerConfig {
        no_input: true,
        ..ServerConfig::default()
    });
    rig.start();
    rig.toolstack.create_domain(DomId(5), "guest5").unwrap();
    let xs = XsClient::from_stream(rig.xenstored.connect(0).unwrap()).unwrap();
    let mut ts =
        displback::sim::toolstack::Toolstack::new(xs).with_timeout(Duration::from_millis(500));
    assert!(
        ts.add_vkbd(BACKEND, DomId(5), 0, &[]).is_err(),
        "nobody serves vkbd"
    );
    assert_eq!(backend_state(&mut rig, 5), XenbusState::Initialising);
}

/// One guest with a display and an input device at once, on one backend: both kinds on
/// the shared XenBus layer. Input keeps flowing while the display flips.
#[test]
fn display_and_input_of_one_guest_together() {
    let mut rig = Rig::new();
    let mut disp = rig.guest(5, &[("Virtual-1", 64, 48)]);
    add_vkbd(&mut rig, 5, &touch_params("T:1000"));
    let mut kbd = connected(&rig, 5, KbdFrontOptions::default());
    let bufs = common::show_and_flip(&rig, &mut disp, 5, 0, (64, 48), 2);
    let format = displback::displif::format::PixelFormat::Xrgb8888;
    for f in 3..=12u32 {
        send(
            &rig,
            5,
            vec![Input::Key {
                code: KEY_A,
                pressed: f % 2 == 1,
            }],
        );
        let (buf, fb) = &bufs[(f % 2) as usize];
        common::draw(buf, format, f, 0);
        disp.page_flip(0, *fb).unwrap();
        disp.wait_flip_event(0, *fb, common::FLIP_WAIT).unwrap();
        assert_eq!(
            kbd.wait_events(1, WAIT).unwrap(),
            vec![key(KEY_A, f % 2 == 1)]
        );
    }
    common::assert_image(
        &rig.frame(5, 0),
        &common::expected(format, 12, 0, 64, 48),
        64,
        48,
    );
    // The display's device and the input device are separate devices of the same guest.
    assert_eq!(backend_state(&mut rig, 5), XenbusState::Connected);
    assert_eq!(
        rig.read("/local/domain/0/backend/vdispl/5/0/state")
            .as_deref(),
        Some("4")
    );
}
