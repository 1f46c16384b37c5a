//! `displback serve`: the backend on real Xen devices.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::backend::evtchn::XenEvtchn;
use crate::backend::gntalloc::Gntalloc;
use crate::backend::gntdev::Gntdev;
use crate::backend::server::{Server, ServerConfig};
use crate::backend::signals::StopSignals;
use crate::backend::xen::{GrantAllocator, Platform};
use crate::backend::xenstore::XsClient;
use crate::backend::DomId;
use crate::config::OutputKind;

/// Open the real Xen interfaces of this domain.
pub fn real_platform() -> Result<Platform> {
    let mut store = XsClient::open().context("connecting to XenStore (is xenstored running?)")?;
    let domid = DomId(store.own_domid().context("reading our domain id")?);
    let evtchn = XenEvtchn::open().context("opening /dev/xen/evtchn (modprobe xen-evtchn)")?;
    let grants = Gntdev::open().context("opening /dev/xen/gntdev (modprobe xen-gntdev)")?;
    let gntalloc: Option<Arc<dyn GrantAllocator>> = match Gntalloc::open() {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            warn!("no /dev/xen/gntalloc ({e}): be-alloc=1 guests will be refused");
            None
        }
    };
    Ok(Platform {
        domid,
        store,
        evtchn: Box::new(evtchn),
        grants: Arc::new(grants),
        gntalloc,
    })
}

/// Run the backend until SIGINT/SIGTERM.
pub fn run(
    output: OutputKind,
    card: Option<&Path>,
    mapping: HashMap<String, String>,
    domid: Option<u16>,
) -> Result<()> {
    let signals = StopSignals::install().context("installing signal handling")?;
    let plat = real_platform()?;
    info!("backend domain {}", plat.domid.0);
    let output = crate::output::open(output, card, mapping)?;
    let mut server = Server::new(
        plat,
        output,
        ServerConfig {
            only_domid: domid.map(DomId),
        },
    )?;
    server.stop_on_readable(signals.as_raw_fd())?;
    server.run()?;
    Ok(())
}
