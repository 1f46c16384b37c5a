//! What libxl does for a `vdispl` device (libxl_vdispl.c, libxl_device.c): write the
//! backend and frontend directories in one transaction and wait for the backend to reach
//! InitWait; on removal ask the backend to close and wait for Closed; on domain death
//! remove the directories.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::sim::SimXen;
use crate::xen::types::{DomId, XenbusState};
use crate::xen::xenstore::{Tx, XsClient, XsError};

/// `LIBXL_INIT_TIMEOUT`: how long libxl waits for the backend to reach InitWait.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// `LIBXL_DESTROY_TIMEOUT`: how long libxl waits for the backend to reach Closed.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// Toolstack errors.
#[derive(Debug, thiserror::Error)]
pub enum ToolstackError {
    #[error(transparent)]
    Xs(#[from] XsError),
    #[error("waiting for xenstore events: {0}")]
    Io(#[from] io::Error),
    #[error(
        "unable to initialize device {path}: backend state is {state:?} after {timeout:?}, \
         expected InitWait"
    )]
    InitTimeout {
        path: String,
        state: XenbusState,
        timeout: Duration,
    },
}

/// `/local/domain/<be>/backend/vdispl/<fe>/<devid>`.
pub fn backend_dir(be: DomId, fe: DomId, devid: u32) -> String {
    format!("/local/domain/{be}/backend/vdispl/{fe}/{devid}")
}

/// `/local/domain/<fe>/device/vdispl/<devid>`.
pub fn frontend_dir(fe: DomId, devid: u32) -> String {
    format!("/local/domain/{fe}/device/vdispl/{devid}")
}

/// One connector of a device: (`unique-id`, width, height).
pub type ConnectorSpec = (String, u32, u32);

/// The simulated toolstack, connected to XenStore as Dom0.
pub struct Toolstack {
    xs: XsClient,
    init_timeout: Duration,
    destroy_timeout: Duration,
}

impl Toolstack {
    /// A toolstack using the libxl timeouts (10 s each).
    pub fn new(xs: XsClient) -> Self {
        Toolstack {
            xs,
            init_timeout: INIT_TIMEOUT,
            destroy_timeout: DESTROY_TIMEOUT,
        }
    }

    /// Use `timeout` for both the InitWait and the Closed waits (short values for tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self.destroy_timeout = timeout;
        self
    }

    /// The underlying XenStore connection.
    pub fn xs(&mut self) -> &mut XsClient {
        &mut self.xs
    }

    /// What domain creation writes: `/local/domain/<dom>/{domid,name}`, the domain
    /// readable by itself. Optional: `add_vdispl` works without it.
    pub fn create_domain(&mut self, dom: DomId, name: &str) -> Result<(), ToolstackError> {
        let path = format!("/local/domain/{dom}");
        let reader = format!("r{dom}");
        self.xs.transaction(|xs, tx| {
            xs.mkdir(tx, &path)?;
            xs.set_perms(tx, &path, &["n0", &reader])?;
            xs.write(tx, &format!("{path}/domid"), &dom.to_string())?;
            xs.write(tx, &format!("{path}/name"), name)?;
            Ok(())
        })?;
        Ok(())
    }

    /// Add a vdispl device like `xl create` / `xl vdispl-attach`: both directories in
    /// one transaction, then wait for the backend to reach InitWait.
    pub fn add_vdispl(
        &mut self,
        be: DomId,
        fe: DomId,
        devid: u32,
        be_alloc: bool,
        connectors: &[ConnectorSpec],
    ) -> Result<(), ToolstackError> {
        let bdir = backend_dir(be, fe, devid);
        let fdir = frontend_dir(fe, devid);
        self.add_device(be, fe, bdir, &fdir, &[], |xs, tx, ro| {
            let ro_write = |xs: &mut XsClient, path: String, value: &str| {
                xs.write(tx, &path, value)?;
                xs.set_perms(tx, &path, ro)
            };
            ro_write(
                xs,
                format!("{fdir}/be-alloc"),
                if be_alloc { "1" } else { "0" },
            )?;
            for (n, (id, w, h)) in connectors.iter().enumerate() {
                ro_write(xs, format!("{fdir}/{n}/resolution"), &format!("{w}x{h}"))?;
                ro_write(xs, format!("{fdir}/{n}/unique-id"), id)?;
            }
            Ok(())
        })
    }

    /// Add a vkbd device like `xl create` with `vkb = [...]` (libxl_vkb.c): both
    /// directories in one transaction, `params` (`unique-id`, `multi-touch-*`,
    /// `feature-disable-*`, `width`, `height`) in the backend directory; then wait for
    /// the backend to reach InitWait.
    pub fn add_vkbd(
        &mut self,
        be: DomId,
        fe: DomId,
        devid: u32,
        params: &[(&str, &str)],
    ) -> Result<(), ToolstackError> {
        // libxl's kind for backend-type=linux is "vinput" (the frontend's stays vkbd).
        let bdir = format!("/local/domain/{be}/backend/vinput/{fe}/{devid}");
        let fdir = format!("/local/domain/{fe}/device/vkbd/{devid}");
        let mut extra = vec![("backend-type", "linux")];
        extra.extend_from_slice(params);
        self.add_device(be, fe, bdir, &fdir, &extra, |_, _, _| Ok(()))
    }

    /// Both directories of a device in one transaction, as libxl writes them (its
    /// perms: the frontend dir is the guest's, the backend may read it; the backend dir
    /// is the backend's, the guest may read it): `backend_extra` nodes in the backend
    /// directory, then `frontend_nodes` (given the read-only perms) in the frontend
    /// directory; then wait for the backend to reach InitWait.
    fn add_device(
        &mut self,
        be: DomId,
        fe: DomId,
        bdir: String,
        fdir: &str,
        backend_extra: &[(&str, &str)],
        mut frontend_nodes: impl FnMut(&mut XsClient, Tx, &[&str]) -> Result<(), XsError>,
    ) -> Result<(), ToolstackError> {
        let (fe_owner, be_reader) = (format!("n{fe}"), format!("r{be}"));
        let (be_owner, fe_reader) = (format!("n{be}"), format!("r{fe}"));
        let rw_front: [&str; 2] = [&fe_owner, &be_reader];
        let ro: [&str; 2] = [&be_owner, &fe_reader];
        self.xs.transaction(|xs, tx| {
            xs.rm(tx, &bdir)?;
            xs.rm(tx, fdir)?;
            xs.mkdir(tx, &bdir)?;
            xs.set_perms(tx, &bdir, &ro)?;
            xs.write(tx, &format!("{bdir}/frontend"), fdir)?;
            xs.write(tx, &format!("{bdir}/frontend-id"), &fe.to_string())?;
            xs.write(tx, &format!("{bdir}/online"), "1")?;
            for (k, v) in backend_extra {
                xs.write(tx, &format!("{bdir}/{k}"), v)?;
            }
            xs.write(
                tx,
                &format!("{bdir}/state"),
                XenbusState::Initialising.as_str(),
            )?;
            xs.mkdir(tx, fdir)?;
            xs.set_perms(tx, fdir, &rw_front)?;
            xs.write(tx, &format!("{fdir}/backend"), &bdir)?;
            xs.write(tx, &format!("{fdir}/backend-id"), &be.to_string())?;
            xs.write(
                tx,
                &format!("{fdir}/state"),
                XenbusState::Initialising.as_str(),
            )?;
            frontend_nodes(xs, tx, &ro)
        })?;
        let state_path = format!("{bdir}/state");
        let timeout = self.init_timeout;
        let state = self.wait_state(&state_path, timeout, |s| s == XenbusState::InitWait)?;
        if state == XenbusState::InitWait {
            Ok(())
        } else {
            Err(ToolstackError::InitTimeout {
                path: bdir,
                state,
                timeout,
            })
        }
    }

    /// Remove a device like `xl vdispl-detach`: backend `online=0` and Closing, wait for
    /// Closed, then remove both directories. Returns whether the backend reached Closed
    /// in time (the directories are removed either way, like libxl's forced removal).
    pub fn remove_vdispl(
        &mut self,
        be: DomId,
        fe: DomId,
        devid: u32,
    ) -> Result<bool, ToolstackError> {
        let bdir = backend_dir(be, fe, devid);
        let fdir = frontend_dir(fe, devid);
        let state_path = format!("{bdir}/state");
        self.xs.transaction(|xs, tx| {
            xs.write(tx, &format!("{bdir}/online"), "0")?;
            let state = xs.read(tx, &state_path)?;
            if state.as_deref().map(XenbusState::parse) != Some(XenbusState::Closed) {
                xs.write(tx, &state_path, XenbusState::Closing.as_str())?;
            }
            Ok(())
        })?;
        let timeout = self.destroy_timeout;
        let state = self.wait_state(&state_path, timeout, |s| s == XenbusState::Closed)?;
        self.xs.transaction(|xs, tx| {
            xs.rm(tx, &fdir)?;
            xs.rm(tx, &bdir)
        })?;
        Ok(state == XenbusState::Closed)
    }

    /// Domain death: remove the guest's vdispl backend directories under `be` and the
    /// guest's whole XenStore tree, then destroy the domain in the simulated hypervisor.
    pub fn destroy_domain(
        &mut self,
        sim: &SimXen,
        be: DomId,
        fe: DomId,
    ) -> Result<(), ToolstackError> {
        self.xs.transaction(|xs, tx| {
            xs.rm(tx, &format!("/local/domain/{be}/backend/vdispl/{fe}"))?;
            xs.rm(tx, &format!("/local/domain/{be}/backend/vinput/{fe}"))?;
            xs.rm(tx, &format!("/local/domain/{fe}"))
        })?;
        sim.destroy_domain(fe);
        Ok(())
    }

    /// Watch `path` until `done(state)` or `timeout`; returns the last state seen.
    fn wait_state(
        &mut self,
        path: &str,
        timeout: Duration,
        done: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, ToolstackError> {
        let token = format!("toolstack:{path}");
        self.xs.watch(path, &token)?;
        let result = self.wait_state_watched(path, timeout, done);
        let unwatch = self.xs.unwatch(path, &token);
        let state = result?;
        unwatch?;
        Ok(state)
    }

    fn wait_state_watched(
        &mut self,
        path: &str,
        timeout: Duration,
        done: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, ToolstackError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = read_state(&mut self.xs, path)?;
            if done(state) {
                return Ok(state);
            }
            // Events read along with replies are buffered by the client: only block when
            // none is pending.
            if !self.xs.take_watch_events()?.is_empty() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(state);
            }
            wait_readable(&[self.xs.as_raw_fd()], deadline - now)?;
        }
    }
}

/// Read a `state` node; a missing node is `Unknown`.
pub(crate) fn read_state(xs: &mut XsClient, path: &str) -> Result<XenbusState, XsError> {
    Ok(xs
        .read(Tx::NONE, path)?
        .as_deref()
        .map_or(XenbusState::Unknown, XenbusState::parse))
}

/// Block until one of `fds` is readable or `timeout` passes (capped at 100 ms, so a
/// readiness that was consumed elsewhere costs at most that much latency).
pub(crate) fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<()> {
    let mut poll = Poll::new()?;
    for (i, fd) in fds.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(fd), Token(i), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(fds.len().max(1));
    match poll.poll(&mut events, Some(timeout.min(Duration::from_millis(100)))) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::xenstored::SimXenstored;

    fn client(d: &SimXenstored, dom: u16) -> XsClient {
        XsClient::from_stream(d.connect(dom).unwrap()).unwrap()
    }

    #[test]
    fn add_vdispl_writes_libxl_layout_and_times_out_without_backend() {
        let d = SimXenstored::new();
        let mut ts = Toolstack::new(client(&d, 0)).with_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let err = ts
            .add_vdispl(
                DomId(0),
                DomId(3),
                0,
                false,
                &[("Virtual-1".into(), 1024, 768), ("b".into(), 640, 480)],
            )
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            err.to_string().contains("unable to initialize device"),
            "{err}"
        );
        let xs = ts.xs();
        let r = |xs: &mut XsClient, p: &str| xs.read(Tx::NONE, p).unwrap();
        let b = "/local/domain/0/backend/vdispl/3/0";
        let f = "/local/domain/3/device/vdispl/0";
        assert_eq!(r(xs, &format!("{b}/frontend")).as_deref(), Some(f));
        assert_eq!(r(xs, &format!("{b}/frontend-id")).as_deref(), Some("3"));
        assert_eq!(r(xs, &format!("{b}/online")).as_deref(), Some("1"));
        assert_eq!(r(xs, &format!("{b}/state")).as_deref(), Some("1"));
        assert_eq!(r(xs, &format!("{f}/backend")).as_deref(), Some(b));
        assert_eq!(r(xs, &format!("{f}/backend-id")).as_deref(), Some("0"));
        assert_eq!(r(xs, &format!("{f}/state")).as_deref(), Some("1"));
        assert_eq!(r(xs, &format!("{f}/be-alloc")).as_deref(), Some("0"));
        assert_eq!(
            r(xs, &format!("{f}/0/resolution")).as_deref(),
            Some("1024x768")
        );
        assert_eq!(
            r(xs, &format!("{f}/0/unique-id")).as_deref(),
            Some("Virtual-1")
        );
        assert_eq!(
            r(xs, &format!("{f}/1/resolution")).as_deref(),
            Some("640x480")
        );
        assert_eq!(r(xs, &format!("{f}/2/resolution")), None);
    }

    /// A backend that answers InitWait and Closed promptly, from another thread.
    #[test]
    fn add_and_remove_succeed_with_an_answering_backend() {
        let d = SimXenstored::new();
        let mut ts = Toolstack::new(client(&d, 0)).with_timeout(Duration::from_secs(5));
        let mut be = client(&d, 0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let backend = std::thread::spawn(move || {
            let path = "/local/domain/0/backend/vdispl/4/1/state";
            be.watch(path, "be").unwrap();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let s = read_state(&mut be, path).unwrap();
                let next = match s {
                    XenbusState::Initialising => Some(XenbusState::InitWait),
                    XenbusState::Closing => Some(XenbusState::Closed),
                    _ => None,
                };
                if let Some(n) = next {
                    be.write(Tx::NONE, path, n.as_str()).unwrap();
                }
                if be.take_watch_events().unwrap().is_empty() {
                    wait_readable(&[be.as_raw_fd()], Duration::from_millis(20)).unwrap();
                }
            }
        });
        ts.add_vdispl(DomId(0), DomId(4), 1, true, &[("x".into(), 8, 8)])
            .unwrap();
        assert!(ts.remove_vdispl(DomId(0), DomId(4), 1).unwrap());
        assert!(!d.exists("/local/domain/0/backend/vdispl/4/1"));
        assert!(!d.exists("/local/domain/4/device/vdispl/1"));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        backend.join().unwrap();
    }

    #[test]
    fn remove_without_backend_reports_timeout_and_cleans_up() {
        let d = SimXenstored::new();
        let mut ts = Toolstack::new(client(&d, 0)).with_timeout(Duration::from_millis(100));
        let _ = ts.add_vdispl(DomId(0), DomId(5), 0, false, &[("a".into(), 4, 4)]);
        assert!(!ts.remove_vdispl(DomId(0), DomId(5), 0).unwrap());
        assert!(!d.exists("/local/domain/0/backend/vdispl/5/0"));
        assert!(!d.exists("/local/domain/5/device/vdispl/0"));
    }

    #[test]
    fn destroy_domain_removes_the_guest_and_its_backend_dirs() {
        let d = SimXenstored::new();
        let sim = SimXen::new();
        let mut ts = Toolstack::new(client(&d, 0)).with_timeout(Duration::from_millis(50));
        ts.create_domain(DomId(6), "guest").unwrap();
        let _ = ts.add_vdispl(DomId(0), DomId(6), 0, false, &[("a".into(), 4, 4)]);
        assert!(d.exists("/local/domain/0/backend/vdispl/6/0/state"));
        ts.destroy_domain(&sim, DomId(0), DomId(6)).unwrap();
        assert!(!d.exists("/local/domain/0/backend/vdispl/6"));
        assert!(!d.exists("/local/domain/6"));
    }
}
