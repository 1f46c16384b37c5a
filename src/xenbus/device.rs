//! One frontend device (domain, device id) of any kind: the XenBus state machine on the
//! backend side (displif.h / kbdif.h "STATE DIAGRAMS", libxenbe's rules). What a
//! connection is made of (rings, pages, channels) is the [`DeviceKind`]'s business.
//!
//! ```text
//!   backend:  Initialising(1) -> InitWait(2) -> [frontend Initialised(3)] -> bind -> Connected(4)
//!   close:    Closing(5) -> unmap/unbind everything -> Closed(6) -> InitWait(2) or stay Closed
//! ```
//! * frontend Initialising while we are Connected: it restarted; close, back to InitWait.
//! * frontend Initialised (or Connected, for kinds that allow it) while we wait: connect,
//!   go Connected.
//! * frontend Closing/Closed while we are Connected: close, back to InitWait.
//! * toolstack writes `online=0` or our state to Closing/Closed: close, stay Closed.
//! * our backend directory disappears (domain death): close without writing anything.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::log_limit::LogLimiter;
use crate::xen::xenstore::{Tx, XsError};
use crate::xen::{DomId, EvtchnPort, Platform, XenbusState};

/// First hold of a device closed for misbehaviour (ring overflow, too many refusals)
/// before it may connect again; doubled per repeat, up to [`MAX_HOLD`].
pub const FIRST_HOLD: Duration = Duration::from_secs(1);
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// Why a device could not connect or had to close.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("xenstore: {0}")]
    Xs(#[from] XsError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Xen(#[from] crate::xen::XenError),
    /// The device kind refused (its output, its ring): a message for the log.
    #[error("{0}")]
    Refused(String),
    #[error("backend directory gone")]
    Gone,
    #[error("device replaced by the toolstack")]
    Replaced,
}

/// What the event loop must do after a device changed.
#[derive(Debug, Default)]
pub struct Effects {
    /// Ports bound (to route to the device, with the kind's ring index) and unbound
    /// (to forget).
    pub bound: Vec<(EvtchnPort, u32)>,
    pub unbound: Vec<EvtchnPort>,
}

/// Where a device lives in XenStore.
#[derive(Clone, Debug)]
pub struct DeviceIds {
    pub dom: DomId,
    pub dev: u32,
    pub be_path: String,
    pub fe_path: String,
}

/// A device kind (`vdispl`, `vkbd`): what a connection is, given the XenStore nodes the
/// frontend published. The state machine around it is [`XenbusDevice`].
pub trait DeviceKind {
    /// The device type in the frontend's XenStore path (`device/<TYPE>/<id>`).
    const TYPE: &'static str;
    /// The directory under our `backend/` (usually [`Self::TYPE`]; libxl puts a
    /// `backend-type=linux` vkbd under `backend/vinput`).
    const BACKEND_DIR: &'static str = Self::TYPE;
    /// What connecting and closing need besides the platform (the output, input hub).
    type Ctx: ?Sized;

    /// The `<TYPE>{dom, dev}` span every method that logs enters.
    fn span(dom: DomId, dev: u32) -> tracing::Span;

    /// Publish the backend's nodes (versions, features) before going Initialising.
    /// Refusing here ignores the device (bad toolstack parameters).
    fn advertise(&mut self, plat: &mut Platform, ids: &DeviceIds) -> Result<(), DeviceError>;

    /// The frontend is ready: map its pages, bind its channels (report them in `fx`).
    /// On error nothing may stay mapped or bound.
    fn connect(
        &mut self,
        plat: &mut Platform,
        ctx: &mut Self::Ctx,
        ids: &DeviceIds,
        fx: &mut Effects,
    ) -> Result<(), DeviceError>;

    /// Drop the connection (if any): unbind (report in `fx`), unmap.
    fn disconnect(&mut self, plat: &mut Platform, ctx: &mut Self::Ctx, fx: &mut Effects);

    /// True while connected.
    fn is_connected(&self) -> bool;

    /// True if a frontend already Connected (to an earlier backend: stale rings) may be
    /// connected to. vdispl: no (it must come back through Initialising); kbdif's
    /// frontend goes Connected without waiting for us, so vkbd: yes.
    fn connect_when_frontend_connected() -> bool {
        false
    }
}

/// One device of kind `K` of one frontend domain.
pub struct XenbusDevice<K: DeviceKind> {
    pub dom: DomId,
    pub dev: u32,
    pub be_path: String,
    pub fe_path: String,
    /// The state we last wrote.
    pub state: XenbusState,
    /// The kind's own state (its live connection).
    pub kind: K,
    /// Removed by the toolstack: stay Closed until the directory goes away.
    removed: bool,
    /// Guest-triggered warnings of this device.
    pub log: LogLimiter,
    /// Closed for misbehaviour: no new connection before this.
    hold_until: Option<Instant>,
    /// Misbehaviour closes in a row (the hold doubles each time).
    strikes: u32,
    /// When the live connection was made.
    connected_at: Option<Instant>,
    /// `<TYPE>{dom, dev}`: entered by every method that logs, so log lines carry the
    /// guest and device without hand-written fields.
    pub span: tracing::Span,
}

impl<K: DeviceKind> XenbusDevice<K> {
    /// A device found under our backend directory. `fe_path` comes from its `frontend` node.
    pub fn new(
        plat: &mut Platform,
        dom: DomId,
        dev: u32,
        be_path: String,
        kind: K,
    ) -> Result<Self, DeviceError> {
        let expected = format!("/local/domain/{}/device/{}/{}", dom.0, K::TYPE, dev);
        let fe_path = match plat.store.read(Tx::NONE, &format!("{be_path}/frontend"))? {
            Some(p) if p == expected => p,
            Some(p) => {
                return Err(DeviceError::Config(format!(
                    "frontend path {p:?} is not {expected}"
                )))
            }
            None => expected,
        };
        let mut d = XenbusDevice {
            dom,
            dev,
            be_path,
            fe_path,
            state: XenbusState::Unknown,
            kind,
            removed: false,
            log: LogLimiter::default(),
            hold_until: None,
            strikes: 0,
            connected_at: None,
            span: K::span(dom, dev),
        };
        let _span = d.span.clone().entered();
        // A previous backend may have left a live state: walk it through Closed so the
        // frontend notices, drops its device, and reconnects to us.
        let found = d.read_state(plat, &d.be_path.clone())?;
        if !matches!(
            found,
            XenbusState::Unknown | XenbusState::Initialising | XenbusState::Closed
        ) {
            info!("taking over from a previous backend (state {found:?})");
            d.write_state(plat, XenbusState::Closing)?;
            d.write_state(plat, XenbusState::Closed)?;
        }
        let ids = d.ids();
        d.kind.advertise(plat, &ids)?;
        d.write_state(plat, XenbusState::Initialising)?;
        Ok(d)
    }

    /// The device's XenStore coordinates.
    pub fn ids(&self) -> DeviceIds {
        DeviceIds {
            dom: self.dom,
            dev: self.dev,
            be_path: self.be_path.clone(),
            fe_path: self.fe_path.clone(),
        }
    }

    fn read_state(&self, plat: &mut Platform, dir: &str) -> Result<XenbusState, XsError> {
        Ok(plat
            .store
            .read(Tx::NONE, &format!("{dir}/state"))?
            .map_or(XenbusState::Unknown, |s| XenbusState::parse(&s)))
    }

    /// Write our state, unless the toolstack removed our directory meanwhile: a write
    /// would re-create it, leaving nodes behind in the backend domain's XenStore (as
    /// Linux's `xenbus_switch_state`, checked in the same transaction as the write).
    fn write_state(&mut self, plat: &mut Platform, s: XenbusState) -> Result<(), XsError> {
        debug!("backend state {:?} -> {s:?}", self.state);
        let dir = &self.be_path;
        let written = plat.store.transaction(|xs, tx| {
            if xs.read(tx, dir)?.is_none() {
                return Ok(false);
            }
            xs.write(tx, &format!("{dir}/state"), s.as_str())?;
            Ok(true)
        })?;
        if !written {
            debug!("backend directory gone: state {s:?} not written");
        }
        self.state = s;
        Ok(())
    }

    /// Re-evaluate after any XenStore change concerning this device.
    pub fn reconcile(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        fx: &mut Effects,
    ) -> Result<(), DeviceError> {
        let _span = self.span.clone().entered();
        let Some(raw) = plat
            .store
            .read(Tx::NONE, &format!("{}/state", self.be_path))?
        else {
            return Err(DeviceError::Gone);
        };
        let actual = XenbusState::parse(&raw);
        if self.removed && actual == XenbusState::Initialising {
            // The toolstack removed the device and made a new one with the same id
            // before we saw the directory go.
            return Err(DeviceError::Replaced);
        }
        let online = plat
            .store
            .read(Tx::NONE, &format!("{}/online", self.be_path))?;
        let removal = online.as_deref() == Some("0")
            || (actual != self.state
                && matches!(actual, XenbusState::Closing | XenbusState::Closed));
        if removal && !self.removed {
            info!("removed by the toolstack");
            self.removed = true;
            self.close(plat, ctx, fx, XenbusState::Closed)?;
            return Ok(());
        }
        if self.removed || self.held() {
            return Ok(());
        }
        if actual == XenbusState::Initialising && self.state != XenbusState::Initialising {
            // Someone reset us: start over.
            self.state = XenbusState::Initialising;
        }
        let fe = self.read_state(plat, &self.fe_path.clone())?;
        use XenbusState::*;
        let ready = fe == Initialised || (fe == Connected && K::connect_when_frontend_connected());
        match (fe, self.state) {
            (Initialising, Connected) => {
                info!("frontend restarted");
                self.close(plat, ctx, fx, InitWait)?;
                self.hold_if_brief();
            }
            (Initialising, Initialising | Closed) => self.write_state(plat, InitWait)?,
            // A vdispl frontend still Connected to a previous backend has stale rings: it
            // must notice our reset and come back through Initialising first.
            (_, Initialising | InitWait) if ready => {
                let ids = self.ids();
                match self.kind.connect(plat, ctx, &ids, fx) {
                    Ok(()) => {
                        self.connected_at = Some(Instant::now());
                        self.write_state(plat, Connected)?;
                        info!("connected");
                    }
                    Err(e) => {
                        if let Some(suppressed) = self.log.allow() {
                            warn!(suppressed, "cannot connect: {e}");
                        }
                        self.close(plat, ctx, fx, Closed)?;
                        // Bad ring refs or channels again and again: back off like any
                        // other misbehaviour.
                        self.hold();
                    }
                }
            }
            (Closing | Closed | Unknown, Initialised | Connected) => {
                info!("frontend closed ({fe:?})");
                self.close(plat, ctx, fx, InitWait)?;
                self.hold_if_brief();
            }
            _ => {}
        }
        Ok(())
    }

    /// Close the connection (if any) and end in `final_state`.
    pub fn close(
        &mut self,
        plat: &mut Platform,
        ctx: &mut K::Ctx,
        fx: &mut Effects,
        final_state: XenbusState,
    ) -> Result<(), DeviceError> {
        if self.state != XenbusState::Closed {
            self.write_state(plat, XenbusState::Closing)?;
        }
        self.teardown(plat, ctx, fx);
        self.write_state(plat, XenbusState::Closed)?;
        if final_state != XenbusState::Closed {
            self.write_state(plat, final_state)?;
        }
        Ok(())
    }

    /// Drop the live connection without touching XenStore (domain gone).
    pub fn teardown(&mut self, plat: &mut Platform, ctx: &mut K::Ctx, fx: &mut Effects) {
        let _span = self.span.clone().entered();
        if self.kind.is_connected() {
            self.kind.disconnect(plat, ctx, fx);
            info!("connection closed");
        }
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.kind.is_connected()
    }

    /// Close for misbehaviour: the device stays Closed for a hold that doubles with each
    /// repeat (reset after a connection that lasted [`MAX_HOLD`]), so a guest looping
    /// through overflow-and-reconnect costs the loop little.
    pub fn hold(&mut self) {
        let _span = self.span.clone().entered();
        if self.connected_at.is_some_and(|t| t.elapsed() >= MAX_HOLD) {
            self.strikes = 0;
        }
        let hold = FIRST_HOLD
            .saturating_mul(1u32 << self.strikes.min(6))
            .min(MAX_HOLD);
        self.strikes = self.strikes.saturating_add(1);
        self.hold_until = Some(Instant::now() + hold);
        info!("held closed for {hold:?} (misbehaviour #{})", self.strikes);
    }

    /// A connection the frontend dropped within a second of making it: a reconnect loop
    /// (each cycle costs the loop a modeset and a restore), so hold it like misbehaviour.
    fn hold_if_brief(&mut self) {
        if self
            .connected_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.hold();
        }
    }

    /// When a hold ends, if one is running.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.hold_until
    }

    /// True while held; clears an expired hold.
    pub fn held(&mut self) -> bool {
        match self.hold_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.hold_until = None;
                false
            }
            None => false,
        }
    }

    /// True once the toolstack asked us to go away.
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// When the live connection was made, if there is one (`displback status`).
    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_at.filter(|_| self.kind.is_connected())
    }
}
