//! `--zero-copy auto|on|off`: the start-up capability probe and the per-buffer decision
//! between zero-copy and the copy path.
//!
//! * `Off`: never export or import; every buffer is mapped and copied.
//! * `Auto`: zero-copy where it works. A failure that says "this system can't" (no
//!   `CONFIG_XEN_GNTDEV_DMABUF`, a PV backend domain) switches it off for every later
//!   buffer; a failure that concerns one buffer (bad grants, no memory) falls back for
//!   that buffer only. Each reason is logged once.
//! * `On`: zero-copy or nothing: start-up fails when the probe says unavailable, and a
//!   buffer whose export fails is refused with that errno.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{info, warn};

use super::buffer::{BackendAllocBuffer, BackendAllocError, DumbBuffer};
use super::{DmaBufError, DmaBufOps, ExportFlags, ExportedDmaBuf};
use crate::backend::{DomId, GrantRef};
use crate::log_limit::LogLimiter;

/// The CLI's `--zero-copy` (one enum for both).
pub use crate::config::ZeroCopy as ZeroCopyPolicy;

/// Why a buffer (or every buffer) takes the copy path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// `--zero-copy off`.
    Disabled,
    /// No gntdev file to issue the ioctls on.
    NoGntdev,
    /// The gntdev file refuses the dma-buf ioctls (`CONFIG_XEN_GNTDEV_DMABUF` missing):
    /// ENOTTY, ENOSYS, EOPNOTSUPP or EINVAL from the probe.
    NoDmaBuf(i32),
    /// A PV backend domain: gntdev maps with PTE modification and EXP_FROM_REFS is EINVAL.
    PvDomain,
    /// A PV backend domain, be-alloc: IMP_TO_REFS derives the frames it grants from the
    /// DMA addresses of the imported buffer (Linux 6.1.y `dmabuf_imp_to_refs`), and in a
    /// PV domain a segment that is contiguous in pseudo-physical but not in machine
    /// memory is bounced through swiotlb: the guest is granted the bounce slot, draws
    /// there, and the display never sees it (measured: whole pages stay black).
    PvImport,
    /// An x86 HVM/PVH backend domain: Linux's gntdev asks Xen for a device mapping of
    /// dma-buf exports on x86 (`GNTMAP_device_map`), which Xen refuses in a domain with
    /// external paging ("No device mapping in HVM domain"), so EXP_FROM_REFS is EINVAL
    /// there too. Guest-buffer zero-copy works on Arm only.
    X86DeviceMap,
    /// The probe failed some other way.
    ProbeFailed(i32),
    /// This buffer's grants could not be mapped (EXP_FROM_REFS EINVAL after exports were
    /// known to work).
    BadGrants,
    /// This buffer's export failed with another errno (ENOMEM, ENOSPC, ...).
    ExportFailed(i32),
    /// be-alloc: the dumb buffer can't be shared with the guest as is.
    BackendAlloc(String),
}

impl FallbackReason {
    /// A short machine-readable name of the reason, logged as a field next to the prose
    /// (`zc_guest=`, `zc_bealloc=`, `zc_reason=`): what the QEMU harness checks.
    pub fn code(&self) -> &'static str {
        match self {
            FallbackReason::Disabled => "disabled",
            FallbackReason::NoGntdev => "no_gntdev",
            FallbackReason::NoDmaBuf(_) => "no_dmabuf",
            FallbackReason::PvDomain => "pv_domain",
            FallbackReason::PvImport => "pv_import",
            FallbackReason::X86DeviceMap => "x86_device_map",
            FallbackReason::ProbeFailed(_) => "probe_failed",
            FallbackReason::BadGrants => "bad_grants",
            FallbackReason::ExportFailed(_) => "export_failed",
            FallbackReason::BackendAlloc(_) => "backend_alloc",
        }
    }

    /// True if the reason holds for every later buffer, not just this one.
    pub fn is_global(&self) -> bool {
        matches!(
            self,
            FallbackReason::Disabled
                | FallbackReason::NoGntdev
                | FallbackReason::NoDmaBuf(_)
                | FallbackReason::PvDomain
                | FallbackReason::PvImport
                | FallbackReason::X86DeviceMap
                | FallbackReason::ProbeFailed(_)
        )
    }
}

impl std::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = |n: i32| std::io::Error::from_raw_os_error(n);
        match self {
            FallbackReason::Disabled => write!(f, "zero-copy is off"),
            FallbackReason::NoGntdev => write!(f, "no gntdev device"),
            FallbackReason::NoDmaBuf(n) => write!(
                f,
                "gntdev has no dma-buf support (CONFIG_XEN_GNTDEV_DMABUF): {}",
                e(*n)
            ),
            FallbackReason::PvDomain => write!(
                f,
                "gntdev cannot export dma-bufs in a PV backend domain (PTE-mod mapping)"
            ),
            FallbackReason::PvImport => write!(
                f,
                "gntdev can grant swiotlb bounce pages instead of the buffer's own in a PV \
                 backend domain"
            ),
            FallbackReason::X86DeviceMap => write!(
                f,
                "on x86 gntdev exports need a device mapping, which Xen refuses in an HVM/PVH \
                 domain"
            ),
            FallbackReason::ProbeFailed(n) => write!(f, "dma-buf probe failed: {}", e(*n)),
            FallbackReason::BadGrants => write!(f, "the guest's grants could not be mapped"),
            FallbackReason::ExportFailed(n) => write!(f, "export failed: {}", e(*n)),
            FallbackReason::BackendAlloc(why) => write!(f, "{why}"),
        }
    }
}

/// The CPU architecture, as far as gntdev's dma-bufs care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86: exports ask for `GNTMAP_device_map` (see [`FallbackReason::X86DeviceMap`]).
    X86,
    /// Arm and others: exports map with `GNTMAP_host_map` only.
    Other,
}

impl Arch {
    /// The architecture this binary runs on.
    pub fn current() -> Self {
        if cfg!(any(target_arch = "x86", target_arch = "x86_64")) {
            Arch::X86
        } else {
            Arch::Other
        }
    }
}

/// What the gntdev file can do, probed once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// EXP_FROM_REFS (zero-copy of guest-allocated buffers).
    pub export: Result<(), FallbackReason>,
    /// IMP_TO_REFS (zero-copy be-alloc).
    pub import: Result<(), FallbackReason>,
    /// `/sys/hypervisor/guest_type` (`PV`, `PVH`, `HVM`), if known.
    pub guest_type: Option<String>,
}

impl Capabilities {
    /// Nothing available (no gntdev file).
    pub fn none(reason: FallbackReason) -> Self {
        Capabilities {
            export: Err(reason.clone()),
            import: Err(reason),
            guest_type: None,
        }
    }

    /// Probe `ops`: EXP_WAIT_RELEASED of an fd that was never exported must answer ENOENT
    /// (reported as `Ok`) where the ioctls exist; a kernel without them answers ENOTTY.
    /// `guest_type` is this domain's type: in a PV domain exports can't work and imports
    /// can't be trusted (see [`FallbackReason::PvImport`]); in an x86 HVM/PVH domain
    /// exports can't work ([`FallbackReason::X86DeviceMap`]).
    pub fn probe(ops: &dyn DmaBufOps, guest_type: Option<&str>, arch: Arch) -> Self {
        let base = match ops.probe() {
            Ok(()) => Ok(()),
            Err(e) => Err(match e.raw_errno() {
                n @ (libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    FallbackReason::NoDmaBuf(n)
                }
                n => FallbackReason::ProbeFailed(n),
            }),
        };
        let guest_type = guest_type.map(|s| s.trim().to_string());
        let (export, import) = match (&base, guest_type.as_deref(), arch) {
            (Ok(()), Some("PV"), _) => {
                (Err(FallbackReason::PvDomain), Err(FallbackReason::PvImport))
            }
            (Ok(()), Some("HVM" | "PVH"), Arch::X86) => (Err(FallbackReason::X86DeviceMap), base),
            _ => (base.clone(), base),
        };
        Capabilities {
            export,
            import,
            guest_type,
        }
    }

    /// [`Capabilities::probe`] with this domain's `/sys/hypervisor/guest_type`.
    pub fn probe_system(ops: &dyn DmaBufOps) -> Self {
        let gt = std::fs::read_to_string("/sys/hypervisor/guest_type").ok();
        Self::probe(ops, gt.as_deref(), Arch::current())
    }
}

/// The per-buffer decision, with the state `Auto` learns along the way.
pub struct ZeroCopyGate {
    policy: ZeroCopyPolicy,
    ops: Option<Arc<dyn DmaBufOps>>,
    flags: ExportFlags,
    export_off: Option<FallbackReason>,
    import_off: Option<FallbackReason>,
    /// Known not to be PV (so EXP_FROM_REFS EINVAL is about the buffer, not the domain).
    not_pv: bool,
    exported_once: bool,
    logged: HashSet<FallbackReason>,
    fallback_logs: u64,
    per_buffer_log: LogLimiter,
}

impl std::fmt::Debug for ZeroCopyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopyGate")
            .field("policy", &self.policy)
            .field("export_off", &self.export_off)
            .field("import_off", &self.import_off)
            .finish()
    }
}

impl ZeroCopyGate {
    /// Decide from the policy and the probe. `On` with exports unavailable is an error
    /// (refuse to start rather than fail every buffer).
    pub fn new(
        policy: ZeroCopyPolicy,
        ops: Option<Arc<dyn DmaBufOps>>,
        caps: &Capabilities,
    ) -> Result<Self, FallbackReason> {
        let (export_off, import_off) = match (policy, &ops) {
            (ZeroCopyPolicy::Off, _) => (
                Some(FallbackReason::Disabled),
                Some(FallbackReason::Disabled),
            ),
            (_, None) => (
                Some(FallbackReason::NoGntdev),
                Some(FallbackReason::NoGntdev),
            ),
            _ => (caps.export.clone().err(), caps.import.clone().err()),
        };
        if policy == ZeroCopyPolicy::On {
            if let Some(r) = &export_off {
                return Err(r.clone());
            }
        }
        let mut gate = ZeroCopyGate {
            policy,
            ops,
            flags: ExportFlags::None,
            export_off: None,
            import_off: None,
            not_pv: matches!(caps.guest_type.as_deref(), Some("HVM" | "PVH")),
            exported_once: false,
            logged: HashSet::new(),
            fallback_logs: 0,
            per_buffer_log: LogLimiter::default(),
        };
        if let Some(r) = export_off {
            gate.disable_exports(r);
        }
        if let Some(r) = import_off {
            gate.import_off = Some(r);
        }
        Ok(gate)
    }

    /// A gate that never tries (`--zero-copy off`, tests).
    pub fn off() -> Self {
        Self::new(
            ZeroCopyPolicy::Off,
            None,
            &Capabilities::none(FallbackReason::Disabled),
        )
        .expect("off never fails")
    }

    /// Ask gntdev for WC or coherent memory behind exports (default: plain pages).
    pub fn with_flags(mut self, flags: ExportFlags) -> Self {
        self.flags = flags;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> ZeroCopyPolicy {
        self.policy
    }

    /// Why exports are off for every buffer, if they are.
    pub fn export_disabled(&self) -> Option<&FallbackReason> {
        self.export_off.as_ref()
    }

    /// Why be-alloc imports are off for every buffer, if they are.
    pub fn import_disabled(&self) -> Option<&FallbackReason> {
        self.import_off.as_ref()
    }

    /// Log lines written about fallbacks (tests: "logged once").
    pub fn fallback_logs(&self) -> u64 {
        self.fallback_logs
    }

    fn log_once(&mut self, reason: &FallbackReason, what: &str) {
        if self.policy == ZeroCopyPolicy::Off {
            return;
        }
        if self.logged.insert(reason.clone()) {
            self.fallback_logs += 1;
            let code = reason.code();
            if reason.is_global() {
                warn!(
                    zc_fallback = %what,
                    zc_reason = %code,
                    zc_global = true,
                    "zero-copy {what} off, using the copy path: {reason}"
                );
            } else {
                info!(
                    zc_fallback = %what,
                    zc_reason = %code,
                    zc_global = false,
                    "zero-copy {what} not possible for a buffer, copying it: {reason}"
                );
            }
        }
    }

    fn disable_exports(&mut self, reason: FallbackReason) {
        self.log_once(&reason, "display");
        self.export_off = Some(reason);
    }

    /// A guest-allocated buffer: export its grants, or `Ok(None)` for the copy path.
    /// Under `On` a failed export is the request's error.
    pub fn export(
        &mut self,
        domid: DomId,
        refs: &[GrantRef],
    ) -> Result<Option<ExportedDmaBuf>, DmaBufError> {
        if self.export_off.is_some() {
            return Ok(None);
        }
        let Some(ops) = self.ops.clone() else {
            return Ok(None);
        };
        let err = match ExportedDmaBuf::export(ops, domid, refs, self.flags) {
            Ok(export) => {
                self.exported_once = true;
                return Ok(Some(export));
            }
            Err(e) => e,
        };
        let reason = match err.raw_errno() {
            n @ (libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP) => FallbackReason::NoDmaBuf(n),
            // EINVAL is also what a grant that can't be mapped gives. Before any export
            // worked, in a domain not known to be HVM/PVH, it means PTE-mod gntdev.
            libc::EINVAL if !self.exported_once && !self.not_pv => FallbackReason::PvDomain,
            libc::EINVAL => FallbackReason::BadGrants,
            n => FallbackReason::ExportFailed(n),
        };
        if self.policy == ZeroCopyPolicy::On {
            return Err(err);
        }
        if reason == FallbackReason::PvDomain && self.import_off.is_none() {
            // Guest type unknown at start and the first export is EINVAL: PV (or an x86
            // HVM domain, where exports fail alike). Imports are off too, to be safe.
            self.log_once(&FallbackReason::PvImport, "be-alloc");
            self.import_off = Some(FallbackReason::PvImport);
        }
        if reason.is_global() {
            self.disable_exports(reason);
        } else if !self.logged.contains(&reason) {
            self.log_once(&reason, "display");
        } else if let Some(suppressed) = self.per_buffer_log.allow() {
            // A guest can repeat per-buffer failures: rate-limited at debug level.
            tracing::debug!(dom = domid.0, suppressed, "copying a buffer: {err}");
        }
        Ok(None)
    }

    /// A be-alloc buffer: make a dumb buffer with `make_dumb` and grant its pages, or
    /// `Ok(None)` for gntalloc pages and the copy path. Under `On` a failure is the
    /// request's error.
    pub fn backend_alloc(
        &mut self,
        domid: DomId,
        pages: usize,
        pitch: u32,
        make_dumb: impl FnOnce() -> std::io::Result<Box<dyn DumbBuffer>>,
    ) -> Result<Option<BackendAllocBuffer>, BackendAllocError> {
        if self.import_off.is_some() {
            return Ok(None);
        }
        let Some(ops) = self.ops.clone() else {
            return Ok(None);
        };
        let result = make_dumb()
            .map_err(BackendAllocError::Create)
            .and_then(|dumb| BackendAllocBuffer::create(ops, dumb, domid, pages, pitch));
        let err = match result {
            Ok(buf) => return Ok(Some(buf)),
            Err(e) => e,
        };
        if self.policy == ZeroCopyPolicy::On {
            return Err(err);
        }
        match &err {
            BackendAllocError::Import(e)
                if matches!(
                    e.raw_errno(),
                    libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP
                ) =>
            {
                let reason = FallbackReason::NoDmaBuf(e.raw_errno());
                self.log_once(&reason, "be-alloc");
                self.import_off = Some(reason);
            }
            // Per buffer (the geometry differs with the mode); one line per distinct text.
            other => {
                let reason = FallbackReason::BackendAlloc(other.to_string());
                if self.logged.len() < 64 {
                    self.log_once(&reason, "be-alloc");
                }
            }
        }
        Ok(None)
    }
}
