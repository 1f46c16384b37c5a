//! `--domain NAME`: the backend serves the domain whose XenStore `name` is NAME, leaves
//! every other guest alone (other names, no name, look-alike names), and follows the
//! name across destroy and re-create under a new domid.

use std::time::Duration;

use displback::backend::server::{Server, ServerConfig};
use displback::backend::xenstore::{Tx, XsClient};
use displback::backend::DomId;
use displback::domain_name::DomainSelector;
use displback::output::headless::Headless;
use displback::sim::frontend::FrontendSim;
use displback::sim::toolstack::Toolstack;
use displback::sim::xenstored::SimXenstored;
use displback::sim::SimXen;

fn state(t: &mut Toolstack, dom: u16) -> Option<String> {
    t.xs()
        .read(
            Tx::NONE,
            &format!("/local/domain/0/backend/vdispl/{dom}/0/state"),
        )
        .unwrap()
}

#[test]
fn domain_name_is_followed_across_re_create() {
    let sim = SimXen::new();
    let xenstored = SimXenstored::new();
    let mut server = Server::new(
        sim.platform(&xenstored, DomId(0)).unwrap(),
        Box::new(Headless::new()),
        ServerConfig {
            only_domain: Some(DomainSelector::new("guest-a").unwrap()),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let stop = server.stop_handle();
    let backend = std::thread::spawn(move || server.run().unwrap());
    let xs = XsClient::from_stream(xenstored.connect(0).unwrap()).unwrap();
    let mut ts = Toolstack::new(xs).with_timeout(Duration::from_secs(1));
    let conns = [("Virtual-1".to_string(), 64, 64)];

    // Not ours: another name, a longer look-alike, a prefix, no name node at all.
    for (dom, name) in [
        (3, Some("guest-b")),
        (4, Some("guest-a2")),
        (5, Some("guest-")),
        (6, None),
    ] {
        if let Some(n) = name {
            ts.create_domain(DomId(dom), n).unwrap();
        }
        assert!(
            ts.add_vdispl(DomId(0), DomId(dom), 0, false, &conns)
                .is_err(),
            "dom{dom} ({name:?}) was answered"
        );
        assert_eq!(
            state(&mut ts, dom).as_deref(),
            Some("1"),
            "dom{dom} touched"
        );
    }

    // Ours, three times over, each with a new domid.
    for dom in [7u16, 8, 12] {
        ts.create_domain(DomId(dom), "guest-a").unwrap();
        ts.add_vdispl(DomId(0), DomId(dom), 0, false, &conns)
            .unwrap_or_else(|e| panic!("dom{dom} named guest-a not answered: {e}"));
        let mut fe = FrontendSim::new(
            &sim,
            XsClient::from_stream(xenstored.connect(dom).unwrap()).unwrap(),
            DomId(dom),
            0,
        )
        .unwrap();
        fe.wait_connected(Duration::from_secs(5)).unwrap();
        assert_eq!(
            state(&mut ts, dom).as_deref(),
            Some("4"),
            "dom{dom} not Connected"
        );
        drop(fe);
        ts.destroy_domain(&sim, DomId(0), DomId(dom)).unwrap();
        assert_eq!(state(&mut ts, dom), None);
    }

    // A renamed domain (xl rename) is not ours any more, even with its device present.
    ts.create_domain(DomId(20), "guest-a").unwrap();
    ts.add_vdispl(DomId(0), DomId(20), 0, false, &conns)
        .unwrap();
    ts.xs()
        .write(Tx::NONE, "/local/domain/20/name", "renamed")
        .unwrap();
    ts.create_domain(DomId(21), "guest-b2").unwrap();
    assert!(ts
        .add_vdispl(DomId(0), DomId(21), 0, false, &conns)
        .is_err());

    // The others were never touched.
    for dom in [3u16, 4, 5, 6, 21] {
        assert_eq!(
            state(&mut ts, dom).as_deref(),
            Some("1"),
            "dom{dom} touched"
        );
    }
    stop.stop();
    backend.join().unwrap();
}
