//! One frontend device (domain, device id): the XenBus state machine on the backend side
//! (displif.h "STATE DIAGRAMS", libxenbe's rules), and the rings of a live connection.
//!
//! ```text
//!   backend:  Initialising(1) -> InitWait(2) -> [frontend Initialised(3)] -> bind -> Connected(4)
//!   close:    Closing(5) -> unmap/unbind everything -> Closed(6) -> InitWait(2) or stay Closed
//! ```
//! * frontend Initialising while we are Connected: it restarted; close, back to InitWait.
//! * frontend Initialised while we wait: bind rings, go Connected. (Connected while we
//!   wait means rings of a previous backend: we wait for the frontend to reconnect.)
//! * frontend Closing/Closed while we are Connected: close, back to InitWait.
//! * toolstack writes `online=0` or our state to Closing/Closed: close, stay Closed.
//! * our backend directory disappears (domain death): close without writing anything.
//!
//! A request answered later ([`Outcome::Deferred`], a zero-copy DBUF_DESTROY waiting
//! for its release) holds its ring: nothing more is consumed from it until
//! [`Device::complete_deferred`] puts the answer on it. Linux sends one request per
//! ring at a time anyway, and this keeps the responses in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use crate::displif::budget::GuestBudget;
use crate::displif::connection::{Connection, ConnectorCfg, PendingRelease, Reply};
use crate::displif::request::{encode_pg_flip_event, encode_response};
use crate::displif::ring::{BackRing, EventProducer, RingError};
use crate::displif::turn::serve_turn;
use crate::output::{ConnectorId, Output};
use crate::xen::xenstore::Tx;
use crate::xen::{DomId, EvtchnPort, GrantRef, Platform};
use crate::xenbus::{DeviceError, DeviceIds, DeviceKind, Effects, XenbusDevice};
pub use crate::xenbus::{FIRST_HOLD, MAX_HOLD};
use crate::zcopy::ZeroCopyGate;

/// Most connectors we accept on one device (Linux uses at most 4).
pub const MAX_CONNECTORS: u32 = 16;
/// Largest connector resolution we accept from XenStore.
pub const MAX_DIMENSION: u32 = 8192;
pub use crate::displif::turn::{REQUESTS_PER_TURN, TURN_BYTES, TURN_TIME};
/// Flip events kept while a frontend's event page is full.
const EVENT_BACKLOG: usize = 64;

/// The rings of one connector of a live connection.
pub struct ConnectorRings {
    pub req: BackRing,
    pub req_port: EvtchnPort,
    pub evt: EventProducer,
    pub evt_port: EvtchnPort,
    backlog: VecDeque<u64>,
    /// A request of this ring is waiting for its deferred answer.
    deferred: bool,
}

/// A connected frontend: request state plus rings.
pub struct Live {
    pub connection: Connection,
    pub rings: Vec<ConnectorRings>,
    pub ids: Vec<ConnectorId>,
    /// Unique per connection in this process: a deferred answer for an earlier
    /// connection of the same device is dropped.
    pub serial: u64,
}

/// Serial numbers of connections ([`Live::serial`]).
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// A request whose answer waits for a blocking release; run
/// [`PendingRelease::wait`] off the event loop, then [`Device::complete_deferred`].
#[derive(Debug)]
pub struct DeferredRequest {
    pub id: u16,
    pub operation: u8,
    /// The connection it belongs to ([`Live::serial`]).
    pub serial: u64,
    pub release: PendingRelease,
}

/// What one turn on a ring left behind.
#[derive(Debug, Default)]
pub struct RingTurn {
    /// Requests remain (budget spent).
    pub more: bool,
    /// The guest keeps hitting its limits: close the connection.
    pub misbehaving: bool,
    /// The ring is held by this request until its answer is complete.
    pub deferred: Option<DeferredRequest>,
}

pub fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim_end_matches('\0');
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse `"<W>x<H>"`, each 1..=MAX_DIMENSION.
pub fn parse_resolution(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (parse_u32(w)?, parse_u32(h)?);
    ((1..=MAX_DIMENSION).contains(&w) && (1..=MAX_DIMENSION).contains(&h)).then_some((w, h))
}

/// A connector id from xl.cfg: non-empty, short, no spaces or separators.
pub fn valid_unique_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The vdispl device kind: a live connection's rings and request state.
pub struct Vdispl {
    pub live: Option<Live>,
    /// The zero-copy decision, shared by all devices.
    zero_copy: Arc<Mutex<ZeroCopyGate>>,
    /// The domain's budget, shared by its devices.
    budget: Arc<GuestBudget>,
}

/// One vdispl device of one frontend domain.
pub type Device = XenbusDevice<Vdispl>;

impl Vdispl {
    /// A device's state before it connects.
    pub fn new(zero_copy: Arc<Mutex<ZeroCopyGate>>, budget: Arc<GuestBudget>) -> Self {
        Vdispl {
            live: None,
            zero_copy,
            budget,
        }
    }

    /// The domain's budget.
    pub fn budget(&self) -> &Arc<GuestBudget> {
        &self.budget
    }
}

impl DeviceKind for Vdispl {
    const TYPE: &'static str = "vdispl";
    type Ctx = dyn Output;

    fn span(dom: DomId, dev: u32) -> tracing::Span {
        tracing::info_span!("vdispl", dom = dom.0, dev)
    }

    fn advertise(&mut self, plat: &mut Platform, ids: &DeviceIds) -> Result<(), DeviceError> {
        plat.store
            .write(Tx::NONE, &format!("{}/versions", ids.be_path), "1,2")?;
        Ok(())
    }

    fn connect(
        &mut self,
        plat: &mut Platform,
        out: &mut Self::Ctx,
        ids: &DeviceIds,
        fx: &mut Effects,
    ) -> Result<(), DeviceError> {
        self.bind(plat, out, ids, fx)
    }

    fn disconnect(&mut self, plat: &mut Platform, out: &mut Self::Ctx, fx: &mut Effects) {
        if let Some(mut live) = self.live.take() {
            live.connection.close(out);
            for r in live.rings {
                for port in [r.req_port, r.evt_port] {
                    if let Err(e) = plat.evtchn.unbind(port) {
                        warn!("unbinding {port:?}: {e}");
                    }
                    fx.unbound.push(port);
                }
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.live.is_some()
    }
}

impl Vdispl {
    fn read_node(plat: &mut Platform, path: &str) -> Result<String, DeviceError> {
        plat.store
            .read(Tx::NONE, path)?
            .ok_or_else(|| DeviceError::Config(format!("{path} is missing")))
    }

    fn read_u32(plat: &mut Platform, path: &str) -> Result<u32, DeviceError> {
        let s = Self::read_node(plat, path)?;
        parse_u32(&s).ok_or_else(|| DeviceError::Config(format!("{path} = {s:?} is not a number")))
    }

    /// The connectors configured in the frontend directory (contiguous from 0).
    fn read_connectors(
        plat: &mut Platform,
        dev: &DeviceIds,
    ) -> Result<Vec<ConnectorCfg>, DeviceError> {
        let mut cfgs = Vec::new();
        for n in 0..MAX_CONNECTORS {
            let base = format!("{}/{n}", dev.fe_path);
            let Some(res) = plat.store.read(Tx::NONE, &format!("{base}/resolution"))? else {
                break;
            };
            let (width, height) = parse_resolution(&res).ok_or_else(|| {
                DeviceError::Config(format!("{base}/resolution = {res:?} is not WxH"))
            })?;
            let unique_id = Self::read_node(plat, &format!("{base}/unique-id"))?;
            if !valid_unique_id(&unique_id) {
                return Err(DeviceError::Config(format!(
                    "{base}/unique-id = {unique_id:?} is not a valid id"
                )));
            }
            cfgs.push(ConnectorCfg {
                unique_id,
                width,
                height,
            });
        }
        if cfgs.is_empty() {
            return Err(DeviceError::Config(format!(
                "{}/0/resolution: no connectors",
                dev.fe_path
            )));
        }
        Ok(cfgs)
    }

    fn bind(
        &mut self,
        plat: &mut Platform,
        out: &mut dyn Output,
        dev: &DeviceIds,
        fx: &mut Effects,
    ) -> Result<(), DeviceError> {
        let cfgs = Self::read_connectors(plat, dev)?;
        let ids: Vec<ConnectorId> = (0..cfgs.len() as u32)
            .map(|idx| ConnectorId {
                dom: dev.dom,
                dev: dev.dev,
                idx,
            })
            .collect();
        // Build everything first; on any error the partial state drops (unmapping and
        // unbinding through `undo`).
        let mut rings: Vec<ConnectorRings> = Vec::new();
        let mut added: Vec<ConnectorId> = Vec::new();
        let result = (|| {
            for (n, cfg) in cfgs.iter().enumerate() {
                let base = format!("{}/{n}", dev.fe_path);
                let req_ref = Self::read_u32(plat, &format!("{base}/req-ring-ref"))?;
                let req_remote = Self::read_u32(plat, &format!("{base}/req-event-channel"))?;
                let evt_ref = Self::read_u32(plat, &format!("{base}/evt-ring-ref"))?;
                let evt_remote = Self::read_u32(plat, &format!("{base}/evt-event-channel"))?;
                if req_ref == 0 || evt_ref == 0 {
                    return Err(DeviceError::Config(format!("{base}: ring grant ref 0")));
                }
                let req_page = plat.grants.map(dev.dom, &[GrantRef(req_ref)], true)?;
                let evt_page = plat.grants.map(dev.dom, &[GrantRef(evt_ref)], true)?;
                let req_port = plat
                    .evtchn
                    .bind_interdomain(dev.dom, EvtchnPort(req_remote))?;
                let evt_port = match plat
                    .evtchn
                    .bind_interdomain(dev.dom, EvtchnPort(evt_remote))
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = plat.evtchn.unbind(req_port);
                        return Err(e.into());
                    }
                };
                rings.push(ConnectorRings {
                    req: BackRing::new(req_page),
                    req_port,
                    evt: EventProducer::new(evt_page),
                    evt_port,
                    backlog: VecDeque::new(),
                    deferred: false,
                });
                out.add_connector(ids[n], &cfg.unique_id, cfg.width, cfg.height)
                    .map_err(|e| {
                        DeviceError::Refused(format!(
                            "output refused connector {}: {e}",
                            cfg.unique_id
                        ))
                    })?;
                added.push(ids[n]);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for id in added {
                out.remove_connector(id);
            }
            for r in rings {
                let _ = plat.evtchn.unbind(r.req_port);
                let _ = plat.evtchn.unbind(r.evt_port);
            }
            return Err(e);
        }
        for (n, r) in rings.iter().enumerate() {
            fx.bound.push((r.req_port, n as u32));
        }
        // Only the toolstack's word allows backend allocation.
        let be_alloc = plat
            .store
            .read(Tx::NONE, &format!("{}/be-alloc", dev.fe_path))?
            .is_some_and(|v| v.trim_end_matches('\0') == "1");
        let connection = Connection::new(
            dev.dom,
            dev.dev,
            cfgs,
            plat.grants.clone(),
            plat.gntalloc.clone(),
            *self.budget.limits(),
        )
        .with_budget(self.budget.clone())
        .with_be_alloc(be_alloc)
        .with_zero_copy(self.zero_copy.clone());
        self.live = Some(Live {
            connection,
            rings,
            ids,
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
        });
        Ok(())
    }
}

impl XenbusDevice<Vdispl> {
    /// Serve connector `idx`'s request ring for one turn ([`serve_turn`]); a deferred
    /// request holds the ring until [`Device::complete_deferred`].
    pub fn serve_ring(
        &mut self,
        plat: &mut Platform,
        out: &mut dyn Output,
        idx: u32,
    ) -> Result<RingTurn, RingError> {
        let _span = self.span.clone().entered();
        let mut turn = RingTurn::default();
        let Some(live) = self.kind.live.as_mut() else {
            return Ok(turn);
        };
        let Some(rings) = live.rings.get_mut(idx as usize) else {
            return Ok(turn);
        };
        if rings.deferred {
            return Ok(turn);
        }
        let t = serve_turn(
            &mut rings.req,
            &mut live.connection,
            idx,
            out,
            |op, status| log_reply(idx, op, status),
        )?;
        if t.notify {
            let _ = plat.evtchn.notify(rings.req_port);
        }
        turn.more = t.more;
        turn.misbehaving = t.misbehaving;
        if let Some(d) = t.deferred {
            rings.deferred = true;
            turn.deferred = Some(DeferredRequest {
                id: d.id,
                operation: d.operation,
                serial: live.serial,
                release: d.release,
            });
        }
        self.send_connection_events(plat);
        Ok(turn)
    }

    /// Hand the output the flips that waited for their refresh (see
    /// [`Connection::submit_queued`]).
    pub fn submit_queued(&mut self, plat: &mut Platform, out: &mut dyn Output) {
        let _span = self.span.clone().entered();
        let Some(live) = self.kind.live.as_mut() else {
            return;
        };
        if !live.connection.has_queued_flips() {
            return;
        }
        live.connection.submit_queued(out);
        // Refresh-paced copies are not a ring's turn: nothing is charged for them.
        live.connection.take_cost();
        self.send_connection_events(plat);
    }

    /// True if a flip of this device waits for its refresh.
    pub fn has_queued_flips(&self) -> bool {
        self.kind
            .live
            .as_ref()
            .is_some_and(|l| l.connection.has_queued_flips())
    }

    /// Flip events the connection decided on (superseded or dropped flips).
    fn send_connection_events(&mut self, plat: &mut Platform) {
        let Some(live) = self.kind.live.as_mut() else {
            return;
        };
        for (idx, cookie) in live.connection.take_flip_events() {
            self.flip_done(plat, idx, cookie);
        }
    }

    /// Answer a deferred request of connector `idx` and free its ring. Returns false
    /// (and sends nothing) if the connection it belonged to is gone.
    pub fn complete_deferred(
        &mut self,
        plat: &mut Platform,
        idx: u32,
        serial: u64,
        id: u16,
        operation: u8,
        reply: Reply,
    ) -> bool {
        let _span = self.span.clone().entered();
        let Some(live) = self.kind.live.as_mut().filter(|l| l.serial == serial) else {
            return false;
        };
        let Some(rings) = live.rings.get_mut(idx as usize) else {
            return false;
        };
        rings.deferred = false;
        log_reply(idx, operation, reply.status);
        rings
            .req
            .put_response(&encode_response(id, operation, reply.status, reply.edid_sz));
        if rings.req.push_responses() {
            let _ = plat.evtchn.notify(rings.req_port);
        }
        true
    }

    /// Send the PG_FLIP event for a completed flip on connector `idx`.
    pub fn flip_done(&mut self, plat: &mut Platform, idx: u32, fb_cookie: u64) {
        let _span = self.span.clone().entered();
        let Some(rings) = self
            .kind
            .live
            .as_mut()
            .and_then(|l| l.rings.get_mut(idx as usize))
        else {
            return;
        };
        if rings.backlog.len() >= EVENT_BACKLOG {
            if let Some(suppressed) = self.log.allow() {
                warn!(
                    suppressed,
                    "event page of connector {idx} stuck: dropping a flip event"
                );
            }
            rings.backlog.pop_front();
        }
        rings.backlog.push_back(fb_cookie);
        Self::flush_events(plat, rings);
    }

    fn flush_events(plat: &mut Platform, rings: &mut ConnectorRings) {
        let mut sent = false;
        while let Some(&cookie) = rings.backlog.front() {
            match rings.evt.push(|id| encode_pg_flip_event(id, cookie)) {
                Ok(()) => {
                    rings.backlog.pop_front();
                    sent = true;
                }
                Err(e) => {
                    debug!("{e}; {} events waiting", rings.backlog.len());
                    break;
                }
            }
        }
        if sent {
            let _ = plat.evtchn.notify(rings.evt_port);
        }
    }

    /// Retry events held back by a full event page (called on any activity).
    pub fn retry_events(&mut self, plat: &mut Platform) {
        let Some(live) = self.kind.live.as_mut() else {
            return;
        };
        for rings in live.rings.iter_mut().filter(|r| !r.backlog.is_empty()) {
            let _span = self.span.enter();
            Self::flush_events(plat, rings);
        }
    }
}

/// Debug log of a reply (the VM harness checks DBUF_DESTROY's status); flips, the
/// bulk of the traffic, are left out.
fn log_reply(conn: u32, operation: u8, status: i32) {
    if operation != crate::displif::wire::op::PG_FLIP {
        debug!(conn, op = operation, status, "reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_strings() {
        assert_eq!(parse_resolution("1024x768"), Some((1024, 768)));
        for bad in [
            "",
            "x",
            "1024",
            "1024x",
            "x768",
            "0x768",
            "-1x5",
            "1024x768x2",
            "99999999999x1",
            "1e3x5",
            " 1x1",
            "10000x10",
        ] {
            assert_eq!(parse_resolution(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unique_ids() {
        assert!(valid_unique_id("HDMI-A-1"));
        assert!(!valid_unique_id(""));
        assert!(!valid_unique_id("a b"));
        assert!(!valid_unique_id("a,b"));
        assert!(!valid_unique_id(&"x".repeat(65)));
    }
}
