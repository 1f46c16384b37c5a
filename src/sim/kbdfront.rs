//! A simulated guest driver that behaves like Linux's `xen-kbdfront`
//! (drivers/input/misc/xen-kbdfront.c): at probe it reads the backend's features and
//! parameters, writes its requests, grants one page and allocates one event channel,
//! goes Initialised; it goes Connected as soon as the backend is InitWait or Connected;
//! on an event it consumes everything published, writes `in_cons` and kicks the backend.
//! Driven synchronously by the calling thread, like [`crate::sim::frontend`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kbdif::ring::InConsumer;
use crate::kbdif::wire::{field, InEvent, DEFAULT_HEIGHT, DEFAULT_WIDTH};
use crate::sim::toolstack::{read_state, wait_readable};
use crate::sim::{SimEvtchn, SimGntalloc, SimXen};
use crate::xen::xenstore::{Tx, XsClient, XsError};
use crate::xen::{
    DomId, EventChannels, EvtchnPort, GrantAllocator, GrantRef, XenError, XenbusState,
};

const TOKEN_BACK: &str = "kbd-back";

/// Errors of the simulated frontend.
#[derive(Debug, thiserror::Error)]
pub enum KbdFrontError {
    #[error(transparent)]
    Xs(#[from] XsError),
    #[error(transparent)]
    Xen(#[from] XenError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("bad configuration: {0}")]
    Config(String),
}

type Result<T, E = KbdFrontError> = std::result::Result<T, E>;

/// Knobs for tests that deviate from what Linux does.
#[derive(Clone, Debug, Default)]
pub struct KbdFrontOptions {
    /// Never consume events (a stuck guest).
    pub never_consume: bool,
    /// Publish this grant ref instead of the real one.
    pub bad_gref: Option<u32>,
    /// Also request raw (unscaled) coordinates.
    pub request_raw: bool,
}

/// What the frontend read from the backend at probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KbdFrontConfig {
    pub abs: bool,
    pub mt: bool,
    pub raw: bool,
    pub width: u32,
    pub height: u32,
    pub mt_width: u32,
    pub mt_height: u32,
    pub mt_contacts: u32,
    pub disable_keyboard: bool,
    pub disable_pointer: bool,
    pub unique_id: Option<String>,
}

/// The simulated xen-kbdfront of one device.
pub struct KbdFrontSim {
    xs: XsClient,
    evtchn: SimEvtchn,
    gntalloc: Arc<SimGntalloc>,
    dir: String,
    backend_dir: String,
    backend_id: DomId,
    opts: KbdFrontOptions,
    state: XenbusState,
    backend_state: XenbusState,
    ring: Option<(InConsumer, GrantRef, EvtchnPort)>,
    /// What arrived, in order.
    pub events: Vec<InEvent>,
    pub config: KbdFrontConfig,
}

impl KbdFrontSim {
    /// Probe device `devid` of guest `domid` like `xenkbd_probe` + `xenkbd_connect_backend`.
    pub fn new(
        sim: &SimXen,
        mut xs: XsClient,
        domid: DomId,
        devid: u32,
        opts: KbdFrontOptions,
    ) -> Result<Self> {
        let dir = format!("/local/domain/{domid}/device/vkbd/{devid}");
        let (backend_dir, backend_id) =
            super::frontend::backend_of(&mut xs, &dir)?.map_err(KbdFrontError::Config)?;
        let mut fe = KbdFrontSim {
            xs,
            evtchn: sim.evtchn(domid),
            gntalloc: sim.gntalloc(domid),
            dir,
            backend_dir,
            backend_id,
            opts,
            state: XenbusState::Initialising,
            backend_state: XenbusState::Unknown,
            ring: None,
            events: Vec::new(),
            config: KbdFrontConfig::default(),
        };
        let bstate = format!("{}/state", fe.backend_dir);
        fe.xs.watch(&bstate, TOKEN_BACK)?;
        fe.probe()?;
        Ok(fe)
    }

    fn read_u32(&mut self, node: &str, default: u32) -> Result<u32> {
        let path = format!("{}/{node}", self.backend_dir);
        Ok(self
            .xs
            .read(Tx::NONE, &path)?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default))
    }

    fn probe(&mut self) -> Result<()> {
        let abs = self.read_u32(field::FEAT_ABS_POINTER, 0)? == 1;
        let raw_feat = self.read_u32(field::FEAT_RAW_POINTER, 0)? == 1;
        let mt_feat = self.read_u32(field::FEAT_MTOUCH, 0)? == 1;
        let unique_id = self.xs.read(
            Tx::NONE,
            &format!("{}/{}", self.backend_dir, field::UNIQUE_ID),
        )?;
        self.config = KbdFrontConfig {
            abs,
            raw: abs && raw_feat && self.opts.request_raw,
            mt: mt_feat,
            width: self.read_u32(field::WIDTH, DEFAULT_WIDTH)?,
            height: self.read_u32(field::HEIGHT, DEFAULT_HEIGHT)?,
            mt_width: self.read_u32(field::MT_WIDTH, 0)?,
            mt_height: self.read_u32(field::MT_HEIGHT, 0)?,
            mt_contacts: if mt_feat {
                self.read_u32(field::MT_NUM_CONTACTS, 0)?
            } else {
                0
            },
            disable_keyboard: self.read_u32(field::FEAT_DSBL_KEYBRD, 0)? == 1,
            disable_pointer: self.read_u32(field::FEAT_DSBL_POINTER, 0)? == 1,
            unique_id,
        };
        let granted = self.gntalloc.alloc(self.backend_id, 1, true)?;
        let gref = *granted
            .refs
            .first()
            .ok_or_else(|| KbdFrontError::Config("no grant".into()))?;
        let port = self.evtchn.alloc_unbound(self.backend_id)?;
        let published = self.opts.bad_gref.unwrap_or(gref.0);
        let dir = self.dir.clone();
        let cfg = self.config.clone();
        self.xs.transaction(|xs, tx| {
            if cfg.abs {
                xs.write(tx, &format!("{dir}/{}", field::REQ_ABS_POINTER), "1")?;
            }
            if cfg.raw {
                xs.write(tx, &format!("{dir}/{}", field::REQ_RAW_POINTER), "1")?;
            }
            if cfg.mt {
                xs.write(tx, &format!("{dir}/{}", field::REQ_MTOUCH), "1")?;
            }
            xs.write(
                tx,
                &format!("{dir}/{}", field::RING_GREF),
                &published.to_string(),
            )?;
            xs.write(
                tx,
                &format!("{dir}/{}", field::EVT_CHANNEL),
                &port.0.to_string(),
            )?;
            Ok(())
        })?;
        self.ring = Some((InConsumer::init(granted.region), gref, port));
        self.switch_state(XenbusState::Initialised)
    }

    fn switch_state(&mut self, state: XenbusState) -> Result<()> {
        self.xs
            .write(Tx::NONE, &format!("{}/state", self.dir), state.as_str())?;
        self.state = state;
        Ok(())
    }

    /// Write our state directly (hostile-guest tests: state games).
    pub fn force_state(&mut self, state: XenbusState) -> Result<()> {
        self.switch_state(state)
    }

    /// Our state.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// The backend's state as last seen.
    pub fn backend_state(&self) -> XenbusState {
        self.backend_state
    }

    /// Write a consumer index of our choosing (hostile-guest tests).
    pub fn set_cons(&mut self, cons: u32) {
        if let Some((ring, _, _)) = self.ring.as_mut() {
            ring.set_cons(cons);
        }
    }

    /// Events published and not consumed.
    pub fn pending(&self) -> u32 {
        self.ring.as_ref().map_or(0, |(r, _, _)| r.pending())
    }

    /// Consume from now on (after `never_consume`), kicking the backend like Linux.
    pub fn set_consume(&mut self, consume: bool) {
        self.opts.never_consume = !consume;
    }

    /// Pump until `done` holds or `timeout` passes; returns whether `done` held.
    pub fn pump_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.xs.take_watch_events()?;
            if events.iter().any(|e| e.token == TOKEN_BACK) {
                let bs = read_state(&mut self.xs, &format!("{}/state", self.backend_dir))?;
                self.backend_changed(bs)?;
            }
            let mut ports = Vec::new();
            self.evtchn.pending(&mut ports)?;
            self.consume()?;
            if done(self) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if !events.is_empty() {
                continue;
            }
            wait_readable(
                &[self.xs.as_raw_fd(), self.evtchn.as_raw_fd()],
                (deadline - now).min(Duration::from_millis(50)),
            )?;
        }
    }

    /// Pump for `timeout`.
    pub fn pump(&mut self, timeout: Duration) -> Result<()> {
        self.pump_until(timeout, |_| false).map(drop)
    }

    /// Pump until both ends are Connected.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        if self.pump_until(timeout, |f| {
            f.state == XenbusState::Connected && f.backend_state == XenbusState::Connected
        })? {
            Ok(())
        } else {
            Err(KbdFrontError::Timeout(format!(
                "Connected (frontend {:?}, backend {:?})",
                self.state, self.backend_state
            )))
        }
    }

    /// Pump until at least `n` events arrived in total; returns them all (and clears).
    pub fn wait_events(&mut self, n: usize, timeout: Duration) -> Result<Vec<InEvent>> {
        if self.pump_until(timeout, |f| f.events.len() >= n)? {
            Ok(std::mem::take(&mut self.events))
        } else {
            Err(KbdFrontError::Timeout(format!(
                "{n} events (got {}: {:?})",
                self.events.len(),
                self.events
            )))
        }
    }

    /// `xenkbd_backend_changed`.
    fn backend_changed(&mut self, bs: XenbusState) -> Result<()> {
        use XenbusState as S;
        self.backend_state = bs;
        match bs {
            S::InitWait if self.state != S::Closed => self.switch_state(S::Connected)?,
            S::Connected if self.state != S::Connected && self.state != S::Closed => {
                self.switch_state(S::Connected)?
            }
            S::Closing | S::Closed if self.state != S::Closed => {
                // xenbus_frontend_closed: the device stays Closed (Linux reprobes only
                // on a new device).
                self.switch_state(S::Closed)?
            }
            _ => {}
        }
        Ok(())
    }

    /// `input_handler`: take every published event, write `in_cons`, kick.
    fn consume(&mut self) -> Result<()> {
        if self.opts.never_consume {
            return Ok(());
        }
        let Some((ring, _, port)) = self.ring.as_mut() else {
            return Ok(());
        };
        // Nothing, or indices this frontend broke itself (hostile tests).
        if ring.pending() == 0 || ring.pending() > crate::kbdif::wire::IN_RING_LEN {
            return Ok(());
        }
        ring.drain(&mut self.events);
        self.evtchn.notify(*port)?;
        Ok(())
    }
}
