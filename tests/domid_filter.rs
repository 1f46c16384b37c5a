//! `--domid N`: a backend that serves one guest only leaves the others alone, and the
//! guest it serves reaches InitWait well within libxl's 10 s.

use std::time::{Duration, Instant};

use displback::backend::server::{Server, ServerConfig};
use displback::output::headless::Headless;
use displback::sim::frontend::FrontendSim;
use displback::sim::toolstack::Toolstack;
use displback::sim::xenstored::SimXenstored;
use displback::sim::SimXen;
use displback::xen::xenstore::{Tx, XsClient};
use displback::xen::DomId;

#[test]
fn domid_filter_serves_one_guest_and_answers_promptly() {
    let sim = SimXen::new();
    let xenstored = SimXenstored::new();
    let mut server = Server::new(
        sim.platform(&xenstored, DomId(0)).unwrap(),
        Box::new(Headless::new()),
        ServerConfig {
            only_domid: Some(DomId(7)),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let stop = server.stop_handle();
    let backend = std::thread::spawn(move || server.run().unwrap());
    let xs = XsClient::from_stream(xenstored.connect(0).unwrap()).unwrap();
    let mut toolstack = Toolstack::new(xs).with_timeout(Duration::from_secs(1));
    let conns = [("Virtual-1".to_string(), 64, 64)];

    // Guest 6 is not ours: nobody answers, like libxl with no backend.
    assert!(toolstack
        .add_vdispl(DomId(0), DomId(6), 0, false, &conns)
        .is_err());
    let state = toolstack
        .xs()
        .read(Tx::NONE, "/local/domain/0/backend/vdispl/6/0/state")
        .unwrap();
    assert_eq!(
        state.as_deref(),
        Some("1"),
        "the filtered backend touched guest 6's device"
    );

    let t0 = Instant::now();
    toolstack
        .add_vdispl(DomId(0), DomId(7), 0, false, &conns)
        .unwrap();
    let to_initwait = t0.elapsed();
    assert!(
        to_initwait < Duration::from_millis(500),
        "InitWait took {to_initwait:?}"
    );
    let mut fe = FrontendSim::new(
        &sim,
        XsClient::from_stream(xenstored.connect(7).unwrap()).unwrap(),
        DomId(7),
        0,
    )
    .unwrap();
    fe.wait_connected(Duration::from_secs(5)).unwrap();
    stop.stop();
    backend.join().unwrap();
    // A clean stop leaves Closed behind so the frontend notices.
    let state = toolstack
        .xs()
        .read(Tx::NONE, "/local/domain/0/backend/vdispl/7/0/state")
        .unwrap();
    assert_eq!(state.as_deref(), Some("6"));
}
