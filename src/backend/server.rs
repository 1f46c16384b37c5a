//! The backend's one event loop: XenStore watches, the shared event-channel fd, the
//! output's events and timers, and a stop signal, multiplexed with mio.
//!
//! Deferred answers: a zero-copy DBUF_DESTROY must wait (up to 2 s) for gntdev to
//! release the guest's grants. The wait runs on a thread of its own (at most one per
//! ring, as a ring with a deferred request is not served); its reply comes back over a
//! channel and the waker, and is put on the ring by the loop, which kept serving every
//! other ring meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::displif::budget::{GuestBudget, Limits};
use crate::displif::connection::Reply;
use crate::output::{FlipDone, Output};
use crate::zcopy::ZeroCopyGate;

use super::frontend::{DeferredRequest, Device, DeviceError, Effects};
use super::readiness::{self, Readiness};
use super::xen::Platform;
use super::xenstore::{Tx, WatchEvent, XsError};
use super::{DomId, EvtchnPort, XenbusState};

const TOK_XS: Token = Token(0);
const TOK_EVTCHN: Token = Token(1);
const TOK_OUTPUT: Token = Token(2);
const TOK_WAKE: Token = Token(3);
/// Extra fd a caller may register (signals).
const TOK_EXTRA: Token = Token(4);
/// The control socket (its connections' tokens are far above).
const TOK_CONTROL: Token = Token(5);

const WATCH_ROOT: &str = "displback:backends";
const WATCH_FE: &str = "displback:fe:";
/// `@introduceDomain`/`@releaseDomain` (with `--domain`): re-resolve the name, rescan.
const WATCH_DOMAINS: &str = "displback:domains";

/// Backend configuration.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Serve this frontend domain only (`--domid`).
    pub only_domid: Option<DomId>,
    /// Serve the domain with this XenStore name only, whatever its domid (`--domain`).
    pub only_domain: Option<crate::domain_name::DomainSelector>,
    /// Per-guest budgets (config file `[limits]`).
    pub limits: Limits,
    /// sd_notify: READY/STATUS/STOPPING/WATCHDOG (`$NOTIFY_SOCKET`; None: no manager).
    pub notify: Option<crate::notify::Notifier>,
    /// XenStore node reading `ready` while we serve, `dead` after a clean stop.
    pub status_node: Option<String>,
    /// Where `displback status` asks (None: no control socket).
    pub control_socket: Option<PathBuf>,
}

/// Stops a running server from another thread.
#[derive(Clone)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// Stop cleanly: close every connection (frontends see Closed) and return.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Stop as if killed: return without writing anything to XenStore (tests of a
    /// backend restart; dropping the server then releases what the kernel would).
    pub fn crash(&self) {
        self.crash.store(true, Ordering::SeqCst);
        self.stop();
    }
}

/// A deferred request's answer, back from its release thread.
struct Released {
    dom: DomId,
    dev: u32,
    idx: u32,
    port: EvtchnPort,
    serial: u64,
    id: u16,
    operation: u8,
    reply: Reply,
}

/// One backend process: every guest, every device.
pub struct Server {
    plat: Platform,
    output: Box<dyn Output + Send>,
    cfg: ServerConfig,
    root: String,
    devices: HashMap<(DomId, u32), Device>,
    /// Each frontend domain's budget, shared by its devices; dropped with its last one.
    budgets: HashMap<DomId, Arc<GuestBudget>>,
    /// Rotates which device's waiting flips are handed to the output first.
    flip_round: usize,
    /// Request-ring port → (device, connector).
    ports: HashMap<EvtchnPort, (DomId, u32, u32)>,
    /// Rings with requests left over after their turn.
    ready: VecDeque<EvtchnPort>,
    poll: Poll,
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    waker: Arc<Waker>,
    extra: Option<RawFd>,
    zero_copy: Arc<Mutex<ZeroCopyGate>>,
    released_tx: Sender<Released>,
    released_rx: Receiver<Released>,
    /// sd_notify, the status node, the control socket.
    readiness: Readiness,
}

/// Errors that stop the whole server (never a single guest's doing).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("xenstore: {0}")]
    Xs(#[from] XsError),
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    #[error("event channels: {0}")]
    Xen(#[from] super::XenError),
}

impl Server {
    /// Set up: find our backend directory, register fds, watch for devices.
    pub fn new(
        mut plat: Platform,
        output: Box<dyn Output + Send>,
        cfg: ServerConfig,
    ) -> Result<Self, ServerError> {
        let own = plat.store.get_domain_path(plat.domid.0)?;
        let root = format!("{own}/backend/vdispl");
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&plat.store.as_raw_fd()),
            TOK_XS,
            Interest::READABLE,
        )?;
        poll.registry().register(
            &mut SourceFd(&plat.evtchn.as_raw_fd()),
            TOK_EVTCHN,
            Interest::READABLE,
        )?;
        if let Some(fd) = output.event_fd() {
            poll.registry()
                .register(&mut SourceFd(&fd), TOK_OUTPUT, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), TOK_WAKE)?);
        plat.store.watch(&root, WATCH_ROOT)?;
        if let Some(sel) = &cfg.only_domain {
            plat.store.watch("@introduceDomain", WATCH_DOMAINS)?;
            plat.store.watch("@releaseDomain", WATCH_DOMAINS)?;
            info!("following the domain named {}", sel.name());
        }
        info!(
            "watching {root}{}",
            cfg.only_domid
                .map(|d| format!(" for dom{}", d.0))
                .or(cfg
                    .only_domain
                    .as_ref()
                    .map(|s| format!(" for {}", s.name())))
                .unwrap_or_default()
        );
        let (released_tx, released_rx) = mpsc::channel();
        let readiness = Readiness::new(
            cfg.notify.clone(),
            cfg.status_node.clone(),
            cfg.control_socket.as_deref(),
            poll.registry(),
            TOK_CONTROL,
        );
        Ok(Server {
            readiness,
            released_tx,
            released_rx,
            zero_copy: Arc::new(Mutex::new(ZeroCopyGate::off())),
            plat,
            output,
            cfg,
            root,
            devices: HashMap::new(),
            budgets: HashMap::new(),
            flip_round: 0,
            ports: HashMap::new(),
            ready: VecDeque::new(),
            poll,
            stop: Arc::new(AtomicBool::new(false)),
            crash: Arc::new(AtomicBool::new(false)),
            waker,
            extra: None,
        })
    }

    /// Decide on zero-copy with `gate` (default: off, every buffer copied).
    pub fn with_zero_copy(mut self, gate: ZeroCopyGate) -> Self {
        self.zero_copy = Arc::new(Mutex::new(gate));
        self
    }

    /// A handle that stops [`Server::run`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            flag: self.stop.clone(),
            crash: self.crash.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Also wake on `fd`; readable = stop (used for a signalfd).
    pub fn stop_on_readable(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), TOK_EXTRA, Interest::READABLE)?;
        self.extra = Some(fd);
        Ok(())
    }

    /// Number of devices currently connected (tests, status).
    pub fn connected(&self) -> usize {
        self.devices.values().filter(|d| d.live.is_some()).count()
    }

    /// Run until stopped. Guest misbehaviour never ends this loop.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(64);
        let mut done: Vec<FlipDone> = Vec::new();
        let mut fired: Vec<EvtchnPort> = Vec::new();
        // The watch is armed (Server::new): scan what exists before saying we serve (its
        // first event, fired on registration, only rescans).
        self.readiness.starting(&mut self.plat.store);
        self.rescan();
        let counts = readiness::counts(&self.devices);
        self.readiness.serving(&mut self.plat.store, counts);
        while !self.stop.load(Ordering::SeqCst) {
            self.drain_watches()?;
            let timeout = if !self.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                let holds = self.devices.values().filter_map(Device::hold_deadline);
                self.output
                    .next_deadline()
                    .into_iter()
                    .chain(holds)
                    .min()
                    .map(|d| d.saturating_duration_since(Instant::now()))
            };
            let timeout = self.readiness.cap_timeout(timeout, Instant::now());
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                if ev.token() == TOK_EXTRA {
                    info!("signal received, stopping");
                    self.stop.store(true, Ordering::SeqCst);
                } else if self.readiness.owns(ev.token()) {
                    self.on_control(ev.token());
                }
            }
            // Always drain both sources: cheap, and immune to missed edges.
            self.drain_watches()?;
            fired.clear();
            self.plat.evtchn.pending(&mut fired)?;
            for port in fired.drain(..) {
                if !self.ready.contains(&port) {
                    self.ready.push_back(port);
                }
            }
            while let Ok(r) = self.released_rx.try_recv() {
                self.on_released(r);
            }
            // One turn for each ready ring; leftovers go to the back of the queue.
            for _ in 0..self.ready.len() {
                let Some(port) = self.ready.pop_front() else {
                    break;
                };
                self.serve_port(port);
            }
            self.output.dispatch(Instant::now(), &mut done);
            for d in done.drain(..) {
                if let Some(dev) = self.devices.get_mut(&(d.conn.dom, d.conn.dev)) {
                    dev.flip_done(&mut self.plat, d.conn.idx, d.fb_cookie);
                }
            }
            self.submit_queued_flips();
            for dev in self.devices.values_mut() {
                dev.retry_events(&mut self.plat);
            }
            self.end_holds();
            let now = Instant::now();
            self.readiness.expire(self.poll.registry(), now);
            self.readiness.tick(now, readiness::counts(&self.devices));
        }
        if !self.crash.load(Ordering::SeqCst) {
            self.shutdown();
        }
        Ok(())
    }

    /// Answer what the control socket asks (`displback status`).
    fn on_control(&mut self, token: Token) {
        for (client, req) in self.readiness.control_event(self.poll.registry(), token) {
            let crate::control::Request::Status { json } = req;
            let status = self.status();
            let text = if json {
                status.to_json()
            } else {
                status.to_text()
            };
            self.readiness.answer(self.poll.registry(), client, text);
        }
    }

    /// What `displback status` shows.
    pub fn status(&self) -> crate::status::Status {
        readiness::snapshot(
            self.plat.domid,
            self.readiness.started,
            &self.devices,
            &self.budgets,
            &*self.output,
        )
    }

    /// Hand the output every flip that waited for its connector's refresh, one device
    /// after another, starting with a different device each time.
    fn submit_queued_flips(&mut self) {
        let mut keys: Vec<(DomId, u32)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.has_queued_flips())
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        keys.sort();
        self.flip_round = self.flip_round.wrapping_add(1);
        let n = keys.len();
        keys.rotate_left(self.flip_round % n);
        for k in keys {
            if let Some(dev) = self.devices.get_mut(&k) {
                dev.submit_queued(&mut self.plat, &mut *self.output);
            }
        }
    }

    /// Let devices whose misbehaviour hold ended connect again.
    fn end_holds(&mut self) {
        let now = Instant::now();
        let ended: Vec<(DomId, u32)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.hold_deadline().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            self.reconcile(k);
        }
    }

    /// Handle watch events until none are left. Events can also arrive while we wait
    /// for a reply to our own request; the client queues those, and the fd will not
    /// signal them again, so this runs before every poll too.
    fn drain_watches(&mut self) -> Result<(), ServerError> {
        loop {
            let events = self.plat.store.take_watch_events()?;
            if events.is_empty() {
                return Ok(());
            }
            for ev in events {
                self.on_watch(ev);
            }
        }
    }

    fn serve_port(&mut self, port: EvtchnPort) {
        let Some(&(dom, dev, idx)) = self.ports.get(&port) else {
            return;
        };
        let Some(device) = self.devices.get_mut(&(dom, dev)) else {
            return;
        };
        match device.serve_ring(&mut self.plat, &mut *self.output, idx) {
            Ok(turn) => {
                if turn.misbehaving {
                    warn!(
                        dom = dom.0,
                        dev, "too many refused requests; closing the connection"
                    );
                    self.close_and_hold(dom, dev);
                    return;
                }
                if turn.more {
                    self.ready.push_back(port);
                }
                if let Some(d) = turn.deferred {
                    self.defer(dom, dev, idx, port, d);
                }
            }
            Err(e) => {
                warn!(
                    dom = dom.0,
                    dev, "connector {idx}: {e}; closing the connection"
                );
                self.close_and_hold(dom, dev);
            }
        }
    }

    /// Run a deferred request's wait on a thread; its answer comes back to the loop.
    fn defer(&mut self, dom: DomId, dev: u32, idx: u32, port: EvtchnPort, d: DeferredRequest) {
        let tx = self.released_tx.clone();
        let waker = self.waker.clone();
        let (id, operation, serial) = (d.id, d.operation, d.serial);
        let spawned = std::thread::Builder::new()
            .name(format!("release-d{}", dom.0))
            .spawn(move || {
                let reply = d.release.wait();
                let r = Released {
                    dom,
                    dev,
                    idx,
                    port,
                    serial,
                    id,
                    operation,
                    reply,
                };
                // A stopped server dropped the receiver: nobody to answer.
                if tx.send(r).is_ok() {
                    let _ = waker.wake();
                }
            });
        if let Err(e) = spawned {
            // The buffer was dropped with the closure (closed, not waited for).
            warn!(dom = dom.0, dev, "no thread for a release wait: {e}");
            self.on_released(Released {
                dom,
                dev,
                idx,
                port,
                serial,
                id,
                operation,
                reply: Reply {
                    status: -libc::EAGAIN,
                    edid_sz: 0,
                },
            });
        }
    }

    /// Put a deferred answer on its ring and serve what queued up behind it. Dropped
    /// silently if the connection closed meanwhile.
    fn on_released(&mut self, r: Released) {
        let Some(device) = self.devices.get_mut(&(r.dom, r.dev)) else {
            return;
        };
        let answered =
            device.complete_deferred(&mut self.plat, r.idx, r.serial, r.id, r.operation, r.reply);
        if answered && !self.ready.contains(&r.port) {
            self.ready.push_back(r.port);
        }
    }

    /// Close a misbehaving device's connection and hold it Closed for a while.
    fn close_and_hold(&mut self, dom: DomId, dev: u32) {
        self.close_device(dom, dev);
        if let Some(device) = self.devices.get_mut(&(dom, dev)) {
            device.hold();
        }
    }

    /// Close one device's connection, ending in Closed, and forget its ports.
    fn close_device(&mut self, dom: DomId, dev: u32) {
        let Some(device) = self.devices.get_mut(&(dom, dev)) else {
            return;
        };
        let mut fx = Effects::default();
        if let Err(e) = device.close(
            &mut self.plat,
            &mut *self.output,
            &mut fx,
            XenbusState::Closed,
        ) {
            warn!(dom = dom.0, dev, "closing: {e}");
        }
        self.apply(dom, dev, fx);
    }

    fn apply(&mut self, dom: DomId, dev: u32, fx: Effects) {
        for port in fx.unbound {
            self.ports.remove(&port);
            self.ready.retain(|p| *p != port);
        }
        for (port, idx) in fx.bound {
            self.ports.insert(port, (dom, dev, idx));
            // Requests may already be waiting (sent before we bound): look now.
            self.ready.push_back(port);
        }
    }

    /// Parse `<root>/<dom>/<dev>[/...]`.
    fn device_of(&self, path: &str) -> Option<(DomId, Option<u32>)> {
        let rest = path.strip_prefix(&self.root)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let dom = parts.next()?.parse::<u16>().ok()?;
        let dev = parts.next().and_then(|d| d.parse::<u32>().ok());
        Some((DomId(dom), dev))
    }

    fn on_watch(&mut self, ev: WatchEvent) {
        debug!("watch {} ({})", ev.path, ev.token);
        if ev.token == WATCH_DOMAINS {
            if let Some(sel) = self.cfg.only_domain.as_mut() {
                sel.resolve(&mut self.plat.store);
            }
            return self.rescan();
        }
        let key = if let Some(rest) = ev.token.strip_prefix(WATCH_FE) {
            let mut it = rest.split(':');
            match (
                it.next().and_then(|d| d.parse().ok()),
                it.next().and_then(|d| d.parse().ok()),
            ) {
                (Some(dom), Some(dev)) => Some((DomId(dom), dev)),
                _ => None,
            }
        } else {
            match self.device_of(&ev.path) {
                Some((dom, Some(dev))) if self.devices.contains_key(&(dom, dev)) => {
                    Some((dom, dev))
                }
                _ => None,
            }
        };
        match key {
            Some(k) => self.reconcile(k),
            None => self.rescan(),
        }
    }

    /// Compare the devices in XenStore with ours: add new ones, drop vanished ones.
    fn rescan(&mut self) {
        let mut present = HashSet::new();
        let doms = match self.plat.store.directory(Tx::NONE, &self.root) {
            Ok(d) => d,
            Err(e) => {
                warn!("listing {}: {e}", self.root);
                return;
            }
        };
        for d in doms {
            let Ok(dom) = d.parse::<u16>() else { continue };
            let dom = DomId(dom);
            if self.cfg.only_domid.is_some_and(|only| only != dom) {
                continue;
            }
            if let Some(sel) = self.cfg.only_domain.as_mut() {
                if !sel.accepts(&mut self.plat.store, dom) {
                    continue;
                }
            }
            let devs = self
                .plat
                .store
                .directory(Tx::NONE, &format!("{}/{}", self.root, dom.0))
                .unwrap_or_default();
            for v in devs {
                if let Ok(dev) = v.parse::<u32>() {
                    present.insert((dom, dev));
                }
            }
        }
        let gone: Vec<_> = self
            .devices
            .keys()
            .filter(|k| !present.contains(k))
            .copied()
            .collect();
        for k in gone {
            self.remove_device(k);
        }
        let mut new: Vec<_> = present
            .into_iter()
            .filter(|k| !self.devices.contains_key(k))
            .collect();
        new.sort();
        for k in new {
            self.add_device(k);
        }
    }

    fn add_device(&mut self, (dom, dev): (DomId, u32)) {
        let be_path = format!("{}/{}/{}", self.root, dom.0, dev);
        let limits = self.cfg.limits;
        let budget = self
            .budgets
            .entry(dom)
            .or_insert_with(|| GuestBudget::new(limits))
            .clone();
        match Device::new(
            &mut self.plat,
            dom,
            dev,
            be_path,
            self.zero_copy.clone(),
            budget,
        ) {
            Ok(device) => {
                info!(dom = dom.0, dev, "new frontend device ({})", device.fe_path);
                let token = format!("{WATCH_FE}{}:{}", dom.0, dev);
                if let Err(e) = self
                    .plat
                    .store
                    .watch(&format!("{}/state", device.fe_path), &token)
                {
                    warn!(dom = dom.0, dev, "watching the frontend: {e}");
                }
                self.devices.insert((dom, dev), device);
                self.reconcile((dom, dev));
            }
            Err(e) => {
                warn!(dom = dom.0, dev, "ignoring device: {e}");
                self.forget_budget_if_unused(dom);
            }
        }
    }

    /// A domain without devices is gone (or lost its last display): its budget goes,
    /// releasing retained be-alloc pages.
    fn forget_budget_if_unused(&mut self, dom: DomId) {
        if !self.devices.keys().any(|(d, _)| *d == dom) {
            if let Some(b) = self.budgets.remove(&dom) {
                debug!(dom = dom.0, "budget released: {b:?}");
            }
        }
    }

    fn remove_device(&mut self, key: (DomId, u32)) {
        let Some(mut device) = self.devices.remove(&key) else {
            return;
        };
        info!(
            dom = key.0 .0,
            dev = key.1,
            "backend directory removed: dropping the device"
        );
        let mut fx = Effects::default();
        device.teardown(&mut self.plat, &mut *self.output, &mut fx);
        let token = format!("{WATCH_FE}{}:{}", key.0 .0, key.1);
        let _ = self
            .plat
            .store
            .unwatch(&format!("{}/state", device.fe_path), &token);
        self.apply(key.0, key.1, fx);
        self.forget_budget_if_unused(key.0);
    }

    fn reconcile(&mut self, key: (DomId, u32)) {
        let Some(device) = self.devices.get_mut(&key) else {
            return;
        };
        let mut fx = Effects::default();
        match device.reconcile(&mut self.plat, &mut *self.output, &mut fx) {
            Ok(()) => {}
            Err(DeviceError::Replaced) => {
                info!(
                    dom = key.0 .0,
                    dev = key.1,
                    "device re-created by the toolstack"
                );
                self.apply(key.0, key.1, fx);
                self.remove_device(key);
                self.add_device(key);
                return;
            }
            Err(e) => {
                // Most often the directory vanished under us (domain death, device
                // removal): rescan decides.
                debug!(dom = key.0 .0, dev = key.1, "reconcile: {e}");
                self.apply(key.0, key.1, fx);
                self.rescan();
                return;
            }
        }
        self.apply(key.0, key.1, fx);
    }

    fn shutdown(&mut self) {
        self.readiness.stopping();
        let keys: Vec<_> = self.devices.keys().copied().collect();
        for (dom, dev) in keys {
            // Leave Closed behind so frontends notice; a restarted backend picks up.
            self.close_device(dom, dev);
        }
        self.readiness
            .stopped(&mut self.plat.store, self.poll.registry());
        info!("stopped");
    }
}
