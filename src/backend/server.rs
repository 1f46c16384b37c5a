//! The backend's one event loop: XenStore watches, the shared event-channel fd, the
//! output's events and timers, and a stop signal, multiplexed with mio.
//!
//! Deferred answers: a zero-copy DBUF_DESTROY must wait (up to 2 s) for gntdev to
//! release the guest's grants. The wait runs on a thread of its own (at most one per
//! ring, as a ring with a deferred request is not served); its reply comes back over a
//! channel and the waker, and is put on the ring by the loop, which kept serving every
//! other ring meanwhile.

use std::collections::HashMap;
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

use crate::displif::device::{DeferredRequest, Vdispl};
use crate::kbdif::device::{Input, KbdDevice, Vkbd};
use crate::xen::xenstore::{WatchEvent, XsError};
use crate::xen::{DomId, EvtchnPort, Platform};
use crate::xenbus::{DeviceKind, DeviceSet, Routes};

use super::readiness::{self, Readiness};

const TOK_XS: Token = Token(0);
const TOK_EVTCHN: Token = Token(1);
const TOK_OUTPUT: Token = Token(2);
const TOK_WAKE: Token = Token(3);
/// Extra fd a caller may register (signals).
const TOK_EXTRA: Token = Token(4);
/// The control socket (its connections' tokens are far above).
const TOK_CONTROL: Token = Token(5);

/// `@introduceDomain`/`@releaseDomain` (with `--domain`): re-resolve the name, rescan.
const WATCH_DOMAINS: &str = "displback:domains";

/// Backend configuration.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Serve this frontend domain only (`--domid`).
    pub only_domid: Option<DomId>,
    /// Serve only the domain with this name, whatever its domid (`--domain`).
    pub only_domain: Option<crate::domain_name::DomainSelector>,
    /// Per-guest budgets (config file `[limits]`).
    pub limits: Limits,
    /// sd_notify: READY/STATUS/STOPPING/WATCHDOG (`$NOTIFY_SOCKET`; None: no manager).
    pub notify: Option<crate::notify::Notifier>,
    /// XenStore node reading `ready` while we serve, `dead` after a clean stop.
    pub status_node: Option<String>,
    /// Where `displback status` asks (None: no control socket).
    pub control_socket: Option<PathBuf>,
    /// Do not serve `vkbd` devices (`--no-input`).
    pub no_input: bool,
}

/// Which guest input device a batch of input is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputTarget {
    /// One device.
    Device(DomId, u32),
    /// Every device whose toolstack `unique-id` is this.
    UniqueId(String),
    /// Seat input on a guest connector's surface (`[wayland] seat_input`): the vkbd
    /// devices of domain `dom` whose `unique-id` equals the connector's, if it has any;
    /// else every vkbd device of `dom`. A guest with several displays and touchscreens
    /// pairs them by unique-id in xl.cfg; a guest with one vkb needs nothing.
    Connector { dom: DomId, unique_id: String },
}

/// Hands input to the server's vkbd devices from another thread (input sources, tests).
#[derive(Clone)]
pub struct InputHandle {
    tx: Sender<(InputTarget, Vec<Input>)>,
    waker: Arc<Waker>,
}

impl InputHandle {
    /// Queue `input` for `target`; false once the server is gone.
    pub fn send(&self, target: InputTarget, input: Vec<Input>) -> bool {
        if self.tx.send((target, input)).is_err() {
            return false;
        }
        let _ = self.waker.wake();
        true
    }
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
    /// The vdispl devices.
    displays: DeviceSet<Vdispl>,
    /// The vkbd devices (None: `--no-input`).
    keyboards: Option<DeviceSet<Vkbd>>,
    input_tx: Sender<(InputTarget, Vec<Input>)>,
    input_rx: Receiver<(InputTarget, Vec<Input>)>,
    /// Each frontend domain's budget, shared by its devices; dropped with its last one.
    budgets: HashMap<DomId, Arc<GuestBudget>>,
    /// Rotates which device's waiting flips are handed to the output first.
    flip_round: usize,
    /// Bound ports → device, and the rings with work left over after their turn.
    routes: Routes,
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
    Xen(#[from] crate::xen::XenError),
}

impl Server {
    /// Set up: find our backend directory, register fds, watch for devices.
    pub fn new(
        mut plat: Platform,
        output: Box<dyn Output + Send>,
        cfg: ServerConfig,
    ) -> Result<Self, ServerError> {
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
        if let Some(sel) = &cfg.only_domain {
            plat.store.watch("@introduceDomain", WATCH_DOMAINS)?;
            plat.store.watch("@releaseDomain", WATCH_DOMAINS)?;
            info!("following the domain named {}", sel.name());
        }
        let displays = DeviceSet::new(&mut plat, cfg.only_domid, cfg.only_domain.clone())?;
        let keyboards = if cfg.no_input {
            None
        } else {
            Some(DeviceSet::new(
                &mut plat,
                cfg.only_domid,
                cfg.only_domain.clone(),
            )?)
        };
        let (input_tx, input_rx) = mpsc::channel();
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
            displays,
            keyboards,
            input_tx,
            input_rx,
            budgets: HashMap::new(),
            flip_round: 0,
            routes: Routes::default(),
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

    /// A handle that hands input to this server's vkbd devices.
    pub fn input_handle(&self) -> InputHandle {
        InputHandle {
            tx: self.input_tx.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Number of vkbd devices currently connected.
    pub fn connected_inputs(&self) -> usize {
        self.keyboards.as_ref().map_or(0, DeviceSet::connected)
    }

    /// Number of vdispl devices currently connected (tests, status).
    pub fn connected(&self) -> usize {
        self.displays.connected()
    }

    /// Run until stopped. Guest misbehaviour never ends this loop.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(64);
        let mut done: Vec<FlipDone> = Vec::new();
        let mut fired: Vec<EvtchnPort> = Vec::new();
        let mut seat_input: Vec<crate::output::SeatInput> = Vec::new();
        // The watch is armed (Server::new): scan what exists before saying we serve (its
        // first event, fired on registration, only rescans).
        self.readiness.starting(&mut self.plat.store);
        self.rescan();
        let counts = readiness::counts(&self.displays.devices);
        self.readiness.serving(&mut self.plat.store, counts);
        // The xenstore fd fired (edge-triggered) since its last drain: read it then, or
        // when the client holds what a request read ([`XsClient::needs_drain`]), not on
        // every turn (two reads per flip that found nothing).
        let mut xs_fired = true;
        while !self.stop.load(Ordering::SeqCst) {
            if std::mem::take(&mut xs_fired) || self.plat.store.needs_drain() {
                self.drain_watches()?;
            }
            let timeout = if !self.routes.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                let holds = self
                    .displays
                    .next_hold_end()
                    .into_iter()
                    .chain(self.keyboards.as_ref().and_then(DeviceSet::next_hold_end));
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
                } else if ev.token() == TOK_XS {
                    xs_fired = true;
                } else if self.readiness.owns(ev.token()) {
                    self.on_control(ev.token());
                }
            }
            if std::mem::take(&mut xs_fired) || self.plat.store.needs_drain() {
                self.drain_watches()?;
            }
            fired.clear();
            self.plat.evtchn.pending(&mut fired)?;
            for port in fired.drain(..) {
                self.routes.mark_ready(port);
            }
            while let Ok(r) = self.released_rx.try_recv() {
                self.on_released(r);
            }
            while let Ok((target, input)) = self.input_rx.try_recv() {
                self.deliver_input(&target, &input);
            }
            // One turn for each ready ring; leftovers go to the back of the queue.
            for _ in 0..self.routes.ready.len() {
                let Some(port) = self.routes.ready.pop_front() else {
                    break;
                };
                self.serve_port(port);
            }
            self.output.dispatch(Instant::now(), &mut done);
            self.output.take_input(&mut seat_input);
            for s in seat_input.drain(..) {
                let target = InputTarget::Connector {
                    dom: s.conn.dom,
                    unique_id: s.unique_id,
                };
                self.deliver_input(&target, &s.input);
            }
            for d in done.drain(..) {
                if let Some(dev) = self.displays.devices.get_mut(&(d.conn.dom, d.conn.dev)) {
                    dev.flip_done(&mut self.plat, d.conn.idx, d.fb_cookie);
                }
            }
            self.submit_queued_flips();
            for dev in self.displays.devices.values_mut() {
                dev.retry_events(&mut self.plat);
            }
            self.end_holds();
            let now = Instant::now();
            self.readiness.expire(self.poll.registry(), now);
            self.readiness
                .tick(now, readiness::counts(&self.displays.devices));
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
            &self.displays.devices,
            &self.budgets,
            &*self.output,
        )
    }

    /// Hand the output every flip that waited for its connector's refresh, one device
    /// after another, starting with a different device each time.
    fn submit_queued_flips(&mut self) {
        let mut keys: Vec<(DomId, u32)> = self
            .displays
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
            if let Some(dev) = self.displays.devices.get_mut(&k) {
                dev.submit_queued(&mut self.plat, &mut *self.output);
            }
        }
    }

    /// Let devices whose misbehaviour hold ended connect again.
    fn end_holds(&mut self) {
        let (plat, out, routes) = (&mut self.plat, &mut *self.output, &mut self.routes);
        let mut make = vdispl_maker(&mut self.budgets, self.cfg.limits, &self.zero_copy);
        self.displays.end_holds(plat, out, routes, &mut make);
        if let Some(k) = self.keyboards.as_mut() {
            k.end_holds(plat, &mut (), routes, &mut |_, _| Vkbd::default());
        }
    }

    /// Hand `input` to its devices. A device whose ring is broken (garbage consumer
    /// index) is closed and held like any misbehaving guest; the others go on.
    fn deliver_input(&mut self, target: &InputTarget, input: &[Input]) {
        let Some(set) = self.keyboards.as_mut() else {
            return;
        };
        let paired = |k: &(DomId, u32), d: &KbdDevice, dom: DomId, uid: &str| {
            k.0 == dom && !uid.is_empty() && d.unique_id() == Some(uid)
        };
        let mut keys: Vec<(DomId, u32)> = set
            .devices
            .iter()
            .filter(|(k, d)| match target {
                InputTarget::Device(dom, dev) => **k == (*dom, *dev),
                InputTarget::UniqueId(id) => d.unique_id() == Some(id.as_str()),
                InputTarget::Connector { dom, unique_id } => {
                    let any_paired = set
                        .devices
                        .iter()
                        .any(|(k, d)| paired(k, d, *dom, unique_id));
                    if any_paired {
                        paired(k, d, *dom, unique_id)
                    } else {
                        k.0 == *dom
                    }
                }
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        for key in keys {
            let Some(device) = set.devices.get_mut(&key) else {
                continue;
            };
            if let Err(e) = device.deliver(&mut self.plat, input) {
                crate::warn_limited!(
                    dom = key.0 .0,
                    dev = key.1,
                    "vkbd: {e}; closing the connection"
                );
                set.close_and_hold(&mut self.plat, &mut (), &mut self.routes, key);
            }
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
        let Some(route) = self.routes.get(port) else {
            return;
        };
        let (dom, dev, idx) = (route.dom, route.dev, route.idx);
        if route.kind != Vdispl::TYPE {
            // A vkbd frontend kicks after consuming: nothing waits for that (a full
            // ring loses events instead of queueing them).
            return;
        }
        let Some(device) = self.displays.devices.get_mut(&(dom, dev)) else {
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
                    self.routes.ready.push_back(port);
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
        let Some(device) = self.displays.devices.get_mut(&(r.dom, r.dev)) else {
            return;
        };
        let answered =
            device.complete_deferred(&mut self.plat, r.idx, r.serial, r.id, r.operation, r.reply);
        if answered {
            self.routes.mark_ready(r.port);
        }
    }

    /// Close a misbehaving device's connection and hold it Closed for a while.
    fn close_and_hold(&mut self, dom: DomId, dev: u32) {
        self.displays.close_and_hold(
            &mut self.plat,
            &mut *self.output,
            &mut self.routes,
            (dom, dev),
        );
    }

    fn on_watch(&mut self, ev: WatchEvent) {
        if ev.token == WATCH_DOMAINS {
            debug!("watch {} ({})", ev.path, ev.token);
            self.displays.resolve_domain(&mut self.plat.store);
            if let Some(k) = self.keyboards.as_mut() {
                k.resolve_domain(&mut self.plat.store);
            }
            return self.rescan();
        }
        if self.displays.owns(&ev) {
            let (plat, out, routes) = (&mut self.plat, &mut *self.output, &mut self.routes);
            {
                let mut make = vdispl_maker(&mut self.budgets, self.cfg.limits, &self.zero_copy);
                self.displays.on_watch(plat, out, routes, &mut make, ev);
            }
            self.forget_unused_budgets();
        } else if let Some(k) = self.keyboards.as_mut().filter(|k| k.owns(&ev)) {
            k.on_watch(
                &mut self.plat,
                &mut (),
                &mut self.routes,
                &mut |_, _| Vkbd::default(),
                ev,
            );
        }
    }

    /// Look at every device in XenStore (start-up).
    fn rescan(&mut self) {
        let (plat, out, routes) = (&mut self.plat, &mut *self.output, &mut self.routes);
        {
            let mut make = vdispl_maker(&mut self.budgets, self.cfg.limits, &self.zero_copy);
            self.displays.rescan(plat, out, routes, &mut make);
        }
        self.forget_unused_budgets();
        if let Some(k) = self.keyboards.as_mut() {
            k.rescan(&mut self.plat, &mut (), &mut self.routes, &mut |_, _| {
                Vkbd::default()
            });
        }
    }

    /// A domain without displays is gone (or lost its last display): its budget goes,
    /// releasing retained be-alloc pages.
    fn forget_unused_budgets(&mut self) {
        let devices = &self.displays.devices;
        self.budgets.retain(|dom, b| {
            let keep = devices.keys().any(|(d, _)| d == dom);
            if !keep {
                debug!(dom = dom.0, "budget released: {b:?}");
            }
            keep
        });
    }

    fn shutdown(&mut self) {
        self.readiness.stopping();
        self.displays
            .shutdown(&mut self.plat, &mut *self.output, &mut self.routes);
        if let Some(k) = self.keyboards.as_mut() {
            k.shutdown(&mut self.plat, &mut (), &mut self.routes);
        }
        self.readiness
            .stopped(&mut self.plat.store, self.poll.registry());
        info!("stopped");
    }
}

/// Makes a new vdispl device's state: its domain's budget (made with the first of the
/// domain's devices) and the shared zero-copy decision.
fn vdispl_maker<'a>(
    budgets: &'a mut HashMap<DomId, Arc<GuestBudget>>,
    limits: Limits,
    zero_copy: &'a Arc<Mutex<ZeroCopyGate>>,
) -> impl FnMut(DomId, u32) -> Vdispl + 'a {
    move |dom, _dev| {
        let budget = budgets
            .entry(dom)
            .or_insert_with(|| GuestBudget::new(limits))
            .clone();
        Vdispl::new(zero_copy.clone(), budget)
    }
}
