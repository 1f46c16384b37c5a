//! The devices of one kind under our backend directory (`<own>/backend/<BACKEND_DIR>`): the
//! watches, hot attach (a new `<dom>/<dev>` directory), detach (directory gone: domain
//! death or toolstack removal), a frontend's state changes, and the routing of bound
//! event-channel ports back to their device.

use std::collections::{HashMap, HashSet, VecDeque};

use tracing::{debug, info, warn};

use crate::domain_name::DomainSelector;
use crate::xen::xenstore::{Tx, WatchEvent, XsClient, XsError};
use crate::xen::{DomId, EvtchnPort, Platform, XenbusState};

use super::device::{DeviceError, DeviceKind, Effects, XenbusDevice};

/// Who a bound port belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// [`DeviceKind::TYPE`] of the device.
    pub kind: &'static str,
    pub dom: DomId,
    pub dev: u32,
    /// The kind's ring index (vdispl: connector).
    pub idx: u32,
}

/// Bound ports of every device of every kind, and the ports with work left.
#[derive(Default)]
pub struct Routes {
    ports: HashMap<EvtchnPort, Route>,
    /// Ports with work: fired, or left over after their turn.
    pub ready: VecDeque<EvtchnPort>,
}

impl Routes {
    /// Where `port` goes.
    pub fn get(&self, port: EvtchnPort) -> Option<Route> {
        self.ports.get(&port).copied()
    }

    /// Queue `port` for a turn unless it is queued already.
    pub fn mark_ready(&mut self, port: EvtchnPort) {
        if !self.ready.contains(&port) {
            self.ready.push_back(port);
        }
    }

    /// Record what a device's change bound and unbound.
    pub fn apply(&mut self, kind: &'static str, dom: DomId, dev: u32, fx: Effects) {
        for port in fx.unbound {
            self.ports.remove(&port);
            self.ready.retain(|p| *p != port);
        }
        for (port, idx) in fx.bound {
            self.ports.insert(
                port,
                Route {
                    kind,
                    dom,
                    dev,
                    idx,
                },
            );
            // Work may already be waiting (sent before we bound): look now.
            self.ready.push_back(port);
        }
    }
}

/// Makes the kind's state of a newly found device.
pub type MakeKind<'a, K> = &'a mut dyn FnMut(DomId, u32) -> K;

/// Every device of kind `K` of every frontend domain we serve.
pub struct DeviceSet<K: DeviceKind> {
    /// `<own domain path>/backend/<BACKEND_DIR>`.
    pub root: String,
    pub devices: HashMap<(DomId, u32), XenbusDevice<K>>,
    /// Serve this frontend domain only.
    pub only_domid: Option<DomId>,
    /// Serve only the domain with this name, whatever its domid (`--domain`).
    pub only_domain: Option<DomainSelector>,
    watch_root: String,
    watch_fe: String,
}

impl<K: DeviceKind> DeviceSet<K> {
    /// Watch our backend directory of this kind.
    pub fn new(
        plat: &mut Platform,
        only_domid: Option<DomId>,
        only_domain: Option<DomainSelector>,
    ) -> Result<Self, XsError> {
        let own = plat.store.get_domain_path(plat.domid.0)?;
        let root = format!("{own}/backend/{}", K::BACKEND_DIR);
        let watch_root = format!("displback:{}:backends", K::TYPE);
        let watch_fe = format!("displback:{}:fe:", K::TYPE);
        plat.store.watch(&root, &watch_root)?;
        info!(
            "watching {root}{}",
            only_domid
                .map(|d| format!(" for dom{}", d.0))
                .or(only_domain.as_ref().map(|s| format!(" for {}", s.name())))
                .unwrap_or_default()
        );
        Ok(DeviceSet {
            root,
            devices: HashMap::new(),
            only_domid,
            only_domain,
            watch_root,
            watch_fe,
        })
    }

    /// With `--domain`: look the name up again (a domain came or went).
    pub fn resolve_domain(&mut self, store: &mut XsClient) {
        if let Some(sel) = self.only_domain.as_mut() {
            sel.resolve(store);
        }
    }

    /// True if `ev` is one of this set's watches.
    pub fn owns(&self, ev: &WatchEvent) -> bool {
        ev.token == self.watch_root || ev.token.starts_with(&self.watch_fe)
    }

    /// Number of devices connected.
    pub fn connected(&self) -> usize {
        self.devices.values().filter(|d| d.is_connected()).count()
    }

    /// Parse `<root>/<dom>/<dev>[/...]`.
    fn device_of(&self, path: &str) -> Option<(DomId, Option<u32>)> {
        let rest = path.strip_prefix(&self.root)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let dom = parts.next()?.parse::<u16>().ok()?;
        let dev = parts.next().and_then(|d| d.parse::<u32>().ok());
        Some((DomId(dom), dev))
    }

    /// Handle one of this set's watch events.
    pub fn on_watch(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        make: MakeKind<'_, K>,
        ev: WatchEvent,
    ) {
        debug!("watch {} ({})", ev.path, ev.token);
        let key = if let Some(rest) = ev.token.strip_prefix(&self.watch_fe) {
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
            Some(k) => self.reconcile(plat, ctx, routes, make, k),
            None => self.rescan(plat, ctx, routes, make),
        }
    }

    /// Compare the devices in XenStore with ours: add new ones, drop vanished ones.
    pub fn rescan(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        make: MakeKind<'_, K>,
    ) {
        let mut present = HashSet::new();
        let doms = match plat.store.directory(Tx::NONE, &self.root) {
            Ok(d) => d,
            Err(e) => {
                warn!("listing {}: {e}", self.root);
                return;
            }
        };
        for d in doms {
            let Ok(dom) = d.parse::<u16>() else { continue };
            let dom = DomId(dom);
            if self.only_domid.is_some_and(|only| only != dom) {
                continue;
            }
            if let Some(sel) = self.only_domain.as_mut() {
                if !sel.accepts(&mut plat.store, dom) {
                    continue;
                }
            }
            let devs = plat
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
            self.remove(plat, ctx, routes, k);
        }
        let mut new: Vec<_> = present
            .into_iter()
            .filter(|k| !self.devices.contains_key(k))
            .collect();
        new.sort();
        for k in new {
            self.add(plat, ctx, routes, make, k);
        }
    }

    fn add(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        make: MakeKind<'_, K>,
        (dom, dev): (DomId, u32),
    ) {
        let be_path = format!("{}/{}/{}", self.root, dom.0, dev);
        match XenbusDevice::new(plat, dom, dev, be_path, make(dom, dev)) {
            Ok(device) => {
                info!(
                    dom = dom.0,
                    dev,
                    "new {} frontend device ({})",
                    K::TYPE,
                    device.fe_path
                );
                let token = format!("{}{}:{}", self.watch_fe, dom.0, dev);
                if let Err(e) = plat
                    .store
                    .watch(&format!("{}/state", device.fe_path), &token)
                {
                    warn!(dom = dom.0, dev, "watching the frontend: {e}");
                }
                self.devices.insert((dom, dev), device);
                self.reconcile(plat, ctx, routes, make, (dom, dev));
            }
            Err(e) => warn!(dom = dom.0, dev, "ignoring {} device: {e}", K::TYPE),
        }
    }

    fn remove(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        key: (DomId, u32),
    ) {
        let Some(mut device) = self.devices.remove(&key) else {
            return;
        };
        info!(
            dom = key.0 .0,
            dev = key.1,
            "{} backend directory removed: dropping the device",
            K::TYPE
        );
        let mut fx = Effects::default();
        device.teardown(plat, ctx, &mut fx);
        let token = format!("{}{}:{}", self.watch_fe, key.0 .0, key.1);
        let _ = plat
            .store
            .unwatch(&format!("{}/state", device.fe_path), &token);
        routes.apply(K::TYPE, key.0, key.1, fx);
    }

    /// Re-evaluate one device after a XenStore change (or the end of its hold).
    pub fn reconcile(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        make: MakeKind<'_, K>,
        key: (DomId, u32),
    ) {
        let Some(device) = self.devices.get_mut(&key) else {
            return;
        };
        let mut fx = Effects::default();
        let result = device.reconcile(plat, ctx, &mut fx);
        routes.apply(K::TYPE, key.0, key.1, fx);
        match result {
            Ok(()) => {}
            Err(DeviceError::Replaced) => {
                info!(
                    dom = key.0 .0,
                    dev = key.1,
                    "device re-created by the toolstack"
                );
                self.remove(plat, ctx, routes, key);
                self.add(plat, ctx, routes, make, key);
            }
            Err(e) => {
                // Most often the directory vanished under us (domain death, device
                // removal): rescan decides.
                debug!(dom = key.0 .0, dev = key.1, "reconcile: {e}");
                self.rescan(plat, ctx, routes, make);
            }
        }
    }

    /// Close one device's connection, ending in Closed, and forget its ports.
    pub fn close(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        key: (DomId, u32),
    ) {
        let Some(device) = self.devices.get_mut(&key) else {
            return;
        };
        let mut fx = Effects::default();
        if let Err(e) = device.close(plat, ctx, &mut fx, XenbusState::Closed) {
            warn!(dom = key.0 .0, dev = key.1, "closing: {e}");
        }
        routes.apply(K::TYPE, key.0, key.1, fx);
    }

    /// Close a misbehaving device's connection and hold it Closed for a while.
    pub fn close_and_hold(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        key: (DomId, u32),
    ) {
        self.close(plat, ctx, routes, key);
        if let Some(device) = self.devices.get_mut(&key) {
            device.hold();
        }
    }

    /// The earliest end of a running hold.
    pub fn next_hold_end(&self) -> Option<std::time::Instant> {
        self.devices
            .values()
            .filter_map(|d| d.hold_deadline())
            .min()
    }

    /// Let devices whose misbehaviour hold ended connect again.
    pub fn end_holds(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        routes: &mut Routes,
        make: MakeKind<'_, K>,
    ) {
        let now = std::time::Instant::now();
        let ended: Vec<(DomId, u32)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.hold_deadline().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            self.reconcile(plat, ctx, routes, make, k);
        }
    }

    /// Close every device, leaving Closed behind so frontends notice (a restarted
    /// backend picks up).
    pub fn shutdown(&mut self, plat: &mut Platform, ctx: &mut K::Ctx, routes: &mut Routes) {
        let keys: Vec<_> = self.devices.keys().copied().collect();
        for key in keys {
            self.close(plat, ctx, routes, key);
        }
    }
}
