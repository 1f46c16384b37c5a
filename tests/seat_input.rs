//! Input an output hands over for a guest connector (the Wayland seat on its surface,
//! `Output::take_input`) reaches the right vkbd devices on the simulated Xen: the one
//! of the connector's domain paired by unique-id when there is one, else every vkbd
//! device of that domain; never another domain's.

mod common;

use std::os::fd::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use common::{Rig, BACKEND, WAIT};
use displback::backend::server::ServerConfig;
use displback::kbdif::device::Input;
use displback::kbdif::wire::InEvent;
use displback::output::headless::Headless;
use displback::output::{ConnectorId, FlipDone, FrameSource, Output, OutputError, SeatInput};
use displback::sim::kbdfront::{KbdFrontOptions, KbdFrontSim};
use displback::xen::xenstore::XsClient;
use displback::xen::DomId;

/// The headless output plus seat input fed by the test.
struct SeatOutput {
    inner: Headless,
    rx: Receiver<SeatInput>,
}

impl Output for SeatOutput {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError> {
        self.inner.add_connector(conn, unique_id, width, height)
    }
    fn remove_connector(&mut self, conn: ConnectorId) {
        self.inner.remove_connector(conn)
    }
    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        self.inner.set_config(conn, frame)
    }
    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        self.inner.page_flip(conn, frame)
    }
    fn event_fd(&self) -> Option<RawFd> {
        self.inner.event_fd()
    }
    fn next_deadline(&self) -> Option<Instant> {
        // Poll the test's channel often.
        let soon = Instant::now() + Duration::from_millis(5);
        Some(self.inner.next_deadline().map_or(soon, |d| d.min(soon)))
    }
    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        self.inner.dispatch(now, done)
    }
    fn take_input(&mut self, out: &mut Vec<SeatInput>) {
        out.extend(self.rx.try_iter());
    }
}

fn keyboard(rig: &mut Rig, dom: u16, dev: u32, unique_id: &str) -> KbdFrontSim {
    rig.toolstack
        .add_vkbd(BACKEND, DomId(dom), dev, &[("unique-id", unique_id)])
        .unwrap();
    let xs = XsClient::from_stream(rig.xenstored.connect(dom).unwrap()).unwrap();
    let mut fe =
        KbdFrontSim::new(&rig.sim, xs, DomId(dom), dev, KbdFrontOptions::default()).unwrap();
    fe.wait_connected(WAIT).unwrap();
    fe
}

fn seat(tx: &Sender<SeatInput>, dom: u16, unique_id: &str, code: u32) {
    tx.send(SeatInput {
        conn: ConnectorId {
            dom: DomId(dom),
            dev: 0,
            idx: 0,
        },
        unique_id: unique_id.into(),
        input: vec![Input::Key {
            code,
            pressed: true,
        }],
    })
    .unwrap();
}

fn pressed(code: u32) -> InEvent {
    InEvent::Key {
        pressed: true,
        keycode: code,
    }
}

/// No (more) events arrive at `fe` within a while.
fn quiet(fe: &mut KbdFrontSim) {
    fe.pump(Duration::from_millis(300)).unwrap();
    let got = fe.wait_events(0, Duration::ZERO).unwrap();
    assert!(got.is_empty(), "unexpected events: {got:?}");
}

#[test]
fn seat_input_follows_the_connector_to_its_domains_keyboards() {
    let (tx, rx) = channel();
    let mut rig = Rig::unstarted(ServerConfig::default());
    for (dom, name) in [(5, "guest5"), (6, "guest6")] {
        rig.toolstack.create_domain(DomId(dom), name).unwrap();
    }
    rig.start_backend(Box::new(SeatOutput {
        inner: Headless::new(),
        rx,
    }));
    let mut d5_paired = keyboard(&mut rig, 5, 0, "1000");
    let mut d5_other = keyboard(&mut rig, 5, 1, "T:2");
    let mut d6 = keyboard(&mut rig, 6, 0, "1000");

    // Connector "1000" of dom 5: its paired keyboard only (dom 6's "1000" is another guest).
    seat(&tx, 5, "1000", 30);
    assert_eq!(d5_paired.wait_events(1, WAIT).unwrap(), vec![pressed(30)]);
    quiet(&mut d5_other);
    quiet(&mut d6);

    // A connector no keyboard of dom 5 is paired with: every keyboard of dom 5.
    seat(&tx, 5, "Virtual-1", 31);
    assert_eq!(d5_paired.wait_events(1, WAIT).unwrap(), vec![pressed(31)]);
    assert_eq!(d5_other.wait_events(1, WAIT).unwrap(), vec![pressed(31)]);
    quiet(&mut d6);

    // Dom 6's connector: dom 6's keyboard.
    seat(&tx, 6, "1000", 32);
    assert_eq!(d6.wait_events(1, WAIT).unwrap(), vec![pressed(32)]);
    quiet(&mut d5_paired);
    quiet(&mut d5_other);

    // A domain without keyboards: nothing, nobody else.
    seat(&tx, 7, "1000", 33);
    quiet(&mut d5_paired);
    quiet(&mut d6);
    rig.stop_backend();
}
