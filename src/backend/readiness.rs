//! How the server tells the world it serves: sd_notify (`READY=1` once every watch is
//! armed and the devices present at start are scanned, `STATUS=` when the counts change,
//! `WATCHDOG=1` from the event loop, `STOPPING=1`), a XenStore status node (`starting`,
//! `ready`, `dead`), and the control socket of `displback status` with the snapshot it
//! answers with. All of it runs on the event loop thread.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Registry, Token};
use tracing::{info, warn};

use crate::control::{ControlServer, Request};
use crate::displif::budget::GuestBudget;
use crate::notify::{status_line, Notifier};
use crate::output::Output;
use crate::status::{
    BudgetStatus, ConnectorStatus, Counts, DeviceStatus, GuestStatus, RefusalStatus, Status,
};

use crate::displif::device::Device;
use crate::xen::xenstore::{Tx, XsClient};
use crate::xen::DomId;

/// The server's readiness reporting (see the module docs).
pub struct Readiness {
    notify: Option<Notifier>,
    next_watchdog: Option<Instant>,
    status_node: Option<String>,
    control: Option<ControlServer>,
    /// The counts the last `STATUS=` carried.
    reported: Option<Counts>,
    pub started: Instant,
}

impl Readiness {
    /// Set up from the server's configuration; the control socket is registered as
    /// `token`. A control socket that cannot be made is logged, not fatal.
    pub fn new(
        notify: Option<Notifier>,
        status_node: Option<String>,
        control_socket: Option<&Path>,
        registry: &Registry,
        token: Token,
    ) -> Self {
        let control = control_socket.and_then(|p| match ControlServer::bind(p, registry, token) {
            Ok(c) => {
                info!("control socket {} (`displback status`)", p.display());
                Some(c)
            }
            Err(e) => {
                warn!("no control socket at {}: {e}", p.display());
                None
            }
        });
        Readiness {
            notify,
            next_watchdog: None,
            status_node,
            control,
            reported: None,
            started: Instant::now(),
        }
    }

    fn write_node(&self, store: &mut XsClient, value: &str) {
        let Some(node) = &self.status_node else {
            return;
        };
        match store.write(Tx::NONE, node, value) {
            Ok(()) => info!("{node} = {value}"),
            Err(e) => warn!(
                "writing {value:?} to {node}: {e} (in a driver domain, a node under \
                 <domain path>/data/ is writable: --status-node)"
            ),
        }
    }

    /// Before the first scan: a `ready` left by a killed predecessor no longer holds.
    pub fn starting(&mut self, store: &mut XsClient) {
        self.write_node(store, "starting");
    }

    /// Every watch is armed and the devices present are handled: say so.
    pub fn serving(&mut self, store: &mut XsClient, counts: Counts) {
        self.write_node(store, "ready");
        if let Some(n) = &self.notify {
            n.notify(&format!("READY=1\n{}", status_line(&counts.line())));
            self.next_watchdog = n.watchdog().map(|w| Instant::now() + w);
        }
        self.reported = Some(counts);
    }

    /// Once per loop turn: a `STATUS=` if the counts changed, `WATCHDOG=1` when due.
    pub fn tick(&mut self, now: Instant, counts: Counts) {
        let Some(n) = &self.notify else {
            return;
        };
        if self.reported != Some(counts) {
            n.notify(&status_line(&counts.line()));
            self.reported = Some(counts);
        }
        if let (Some(due), Some(every)) = (self.next_watchdog, n.watchdog()) {
            if now >= due {
                n.notify("WATCHDOG=1");
                self.next_watchdog = Some(now + every);
            }
        }
    }

    /// Shorten the loop's poll `timeout` so the watchdog and idle control connections
    /// are served in time.
    pub fn cap_timeout(&self, timeout: Option<Duration>, now: Instant) -> Option<Duration> {
        let ours = self
            .next_watchdog
            .into_iter()
            .chain(self.control.as_ref().and_then(ControlServer::next_deadline))
            .min()
            .map(|t| t.saturating_duration_since(now));
        match (timeout, ours) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True for the control socket's tokens.
    pub fn owns(&self, token: Token) -> bool {
        self.control.as_ref().is_some_and(|c| c.owns(token))
    }

    /// Handle a control socket event; returns the requests to answer.
    pub fn control_event(&mut self, registry: &Registry, token: Token) -> Vec<(Token, Request)> {
        match self.control.as_mut() {
            Some(c) => c.on_event(registry, token),
            None => Vec::new(),
        }
    }

    /// Answer a control request.
    pub fn answer(&mut self, registry: &Registry, token: Token, text: String) {
        if let Some(c) = self.control.as_mut() {
            c.answer(registry, token, text);
        }
    }

    /// Drop idle control connections.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        if let Some(c) = self.control.as_mut() {
            c.expire(registry, now);
        }
    }

    /// A clean stop begins.
    pub fn stopping(&mut self) {
        if let Some(n) = &self.notify {
            n.notify(&format!("STOPPING=1\n{}", status_line("stopping")));
        }
    }

    /// Every connection is closed: the node says `dead`, the control socket goes.
    pub fn stopped(&mut self, store: &mut XsClient, registry: &Registry) {
        self.write_node(store, "dead");
        if let Some(c) = self.control.take() {
            c.close(registry);
        }
    }
}

/// The counts of the `STATUS=` line.
pub fn counts(devices: &HashMap<(DomId, u32), Device>) -> Counts {
    let mut doms: Vec<DomId> = devices.keys().map(|(d, _)| *d).collect();
    doms.sort();
    doms.dedup();
    let live = devices.values().filter_map(|d| d.kind.live.as_ref());
    Counts {
        guests: doms.len(),
        devices: devices.len(),
        connected: live.clone().count(),
        connectors: live.map(|l| l.ids.len()).sum(),
    }
}

/// What `displback status` shows.
pub fn snapshot(
    backend: DomId,
    started: Instant,
    devices: &HashMap<(DomId, u32), Device>,
    budgets: &HashMap<DomId, Arc<GuestBudget>>,
    output: &dyn Output,
) -> Status {
    let now = Instant::now();
    let mut keys: Vec<(DomId, u32)> = devices.keys().copied().collect();
    keys.sort();
    let mut guests: Vec<GuestStatus> = Vec::new();
    for key in keys {
        let d = &devices[&key];
        if guests.last().is_none_or(|g| g.domid != key.0 .0) {
            guests.push(GuestStatus {
                domid: key.0 .0,
                budget: budget_status(budgets.get(&key.0).map(|b| &**b)),
                devices: Vec::new(),
            });
        }
        let mut dev = DeviceStatus {
            dev: d.dev,
            state: format!("{:?}", d.state),
            connected: d.is_connected(),
            connected_secs: d
                .connected_since()
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            held_secs: d
                .hold_deadline()
                .filter(|t| *t > now)
                .map(|t| (t - now).as_secs_f64()),
            removed: d.removed(),
            display_buffers: 0,
            framebuffers: 0,
            refusals: 0,
            last_refusal: None,
            connectors: Vec::new(),
        };
        if let Some(live) = &d.kind.live {
            let c = &live.connection;
            (dev.display_buffers, dev.framebuffers) = c.counts();
            let stats = c.stats();
            dev.refusals = stats.refusals;
            dev.last_refusal = stats.last_refusal.as_ref().map(|r| RefusalStatus {
                request: r.request.clone(),
                errno: r.errno,
                reason: r.reason.clone(),
                secs_ago: now.saturating_duration_since(r.at).as_secs_f64(),
            });
            for (i, (cfg, path)) in c.connector_paths().into_iter().enumerate() {
                let cs = stats.connectors.get(i);
                dev.connectors.push(ConnectorStatus {
                    index: i as u32,
                    unique_id: cfg.unique_id.clone(),
                    width: cfg.width,
                    height: cfg.height,
                    target: live.ids.get(i).and_then(|id| output.target(*id)),
                    path: path.map(|p| p.as_str()),
                    flips: cs.map_or(0, |s| s.flips),
                    flips_per_sec: cs.map_or(0.0, |s| s.rate.per_sec(now)),
                });
            }
        }
        if let Some(g) = guests.last_mut() {
            g.devices.push(dev);
        }
    }
    Status {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        backend_domid: backend.0,
        uptime_secs: now.saturating_duration_since(started).as_secs_f64(),
        counts: counts(devices),
        guests,
    }
}

fn budget_status(b: Option<&GuestBudget>) -> BudgetStatus {
    let limits = b.map(|b| *b.limits()).unwrap_or_default();
    let used = b.map(GuestBudget::usage).unwrap_or_default();
    BudgetStatus {
        bytes: used.bytes,
        bytes_limit: limits.max_total_bytes,
        buffers: used.buffers,
        buffers_limit: limits.max_buffers,
        framebuffers: used.fbs,
        framebuffers_limit: limits.max_fbs,
        grant_mappings: used.grant_mappings,
        grant_mappings_limit: limits.max_grant_mappings,
        retained_pages: b.map_or(0, GuestBudget::retained_pages),
    }
}
