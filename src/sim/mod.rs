//! An in-process simulated Xen (XenStore daemon, event channels, grant tables) and a
//! frontend that behaves like Linux's xen-drm-front.
pub mod pattern;
pub mod xenstored;

// Simulated guest driver and toolstack.
pub mod frontend;
pub mod kbdfront;
pub mod toolstack;

// Simulated hypervisor: event channels and grant tables, behind one `SimXen` hub.
pub mod evtchn;
pub mod grants;

pub use evtchn::SimEvtchn;
pub use grants::{SimGntalloc, SimGntdev, SimGuestMem, SimPages};

use std::sync::Arc;

use crate::xen::types::{DomId, XenError};

/// An errno-style error for the simulation (same shape as the real devices' errors).
pub(crate) fn errno(op: &'static str, code: i32) -> XenError {
    XenError::Io {
        op,
        source: std::io::Error::from_raw_os_error(code),
    }
}

/// The simulated hypervisor shared by the backend and simulated guests of one process:
/// event channels and grant tables of every domain. Cheap to clone.
#[derive(Clone, Default)]
pub struct SimXen {
    evtchn: Arc<evtchn::EvtchnHub>,
    grants: Arc<grants::GrantHub>,
}

impl SimXen {
    /// An empty hypervisor: no ports, no grants.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new event-channel handle in `domid`, like one open of /dev/xen/evtchn.
    ///
    /// # Panics
    /// Never on a sane host; only if the process cannot create an eventfd.
    pub fn evtchn(&self, domid: DomId) -> SimEvtchn {
        self.try_evtchn(domid)
            .unwrap_or_else(|e| panic!("simulated evtchn for {domid:?}: {e}"))
    }

    /// As [`Self::evtchn`], reporting eventfd creation failure.
    pub fn try_evtchn(&self, domid: DomId) -> Result<SimEvtchn, XenError> {
        self.evtchn.open(domid)
    }

    /// `domid`'s memory and grant table, guest side.
    pub fn guest_mem(&self, domid: DomId) -> SimGuestMem {
        SimGuestMem::new(Arc::clone(&self.grants), domid)
    }

    /// A gntdev for `mapping_dom` (the backend's view of foreign grants).
    pub fn grant_mapper(&self, mapping_dom: DomId) -> Arc<SimGntdev> {
        Arc::new(SimGntdev::new(Arc::clone(&self.grants), mapping_dom))
    }

    /// A gntalloc for `dom` (granting its own pages to another domain).
    pub fn gntalloc(&self, dom: DomId) -> Arc<SimGntalloc> {
        Arc::new(SimGntalloc::new(Arc::clone(&self.grants), dom))
    }

    /// Destroy `domid`: its event channels close (peers' notifies become no-ops), its
    /// unbound ports are forgotten, its grants can no longer be mapped; existing
    /// mappings of its pages stay valid until unmapped.
    pub fn destroy_domain(&self, domid: DomId) {
        self.evtchn.destroy_domain(domid);
        self.grants.destroy_domain(domid);
    }

    /// Everything a backend in `domid` needs, on this simulated Xen and `xenstored`.
    pub fn platform(
        &self,
        xenstored: &xenstored::SimXenstored,
        domid: DomId,
    ) -> Result<crate::xen::platform::Platform, crate::xen::xenstore::XsError> {
        let store = crate::xen::xenstore::XsClient::from_stream(xenstored.connect(domid.0)?)?;
        Ok(crate::xen::platform::Platform {
            domid,
            store,
            evtchn: Box::new(
                self.try_evtchn(domid)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
            grants: self.grant_mapper(domid),
            gntalloc: Some(self.gntalloc(domid)),
        })
    }

    /// The dma-buf exporter of backend domain `mapping_dom` on this host's
    /// `/dev/udmabuf` (zero-copy without Xen). Fails when the device is missing.
    pub fn udmabuf_exporter(
        &self,
        mapping_dom: DomId,
    ) -> std::io::Result<crate::zcopy::sim::UdmabufExporter> {
        let dev = crate::zcopy::udmabuf::Udmabuf::open()?;
        Ok(crate::zcopy::sim::UdmabufExporter::new(
            dev,
            Arc::clone(&self.grants),
            mapping_dom,
        ))
    }

    /// Grant pages currently mapped by anyone (all mappers, guests included).
    pub fn total_mapped_pages(&self) -> usize {
        self.grants.total_mapped_pages()
    }
}

impl std::fmt::Debug for SimXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimXen({} pages mapped)", self.total_mapped_pages())
    }
}

/// Run the calling thread at the lowest priority (nice 19), as a stand-in for a guest's
/// vCPU: on Xen a guest's CPU time is not the backend domain's, so a simulated guest
/// spinning in a loop must not take the backend's CPU away (benchmarks of the backend's
/// own fairness). Not `SCHED_IDLE`: a guest thread preempted while it holds a lock of the
/// simulated hypervisor must still get the CPU back promptly.
pub fn run_as_guest_vcpu() -> std::io::Result<()> {
    // SAFETY: no pointers; on Linux `who == 0` with PRIO_PROCESS names the calling
    // thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
