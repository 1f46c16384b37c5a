//! `displback serve`: the backend on real Xen devices.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::backend::server::{Server, ServerConfig};
use crate::config::{OutputKind, ZeroCopy};
use crate::displif::budget::Limits;
use crate::xen::evtchn::XenEvtchn;
use crate::xen::gntalloc::Gntalloc;
use crate::xen::gntdev::Gntdev;
use crate::xen::platform::{GrantAllocator, Platform};
use crate::xen::signals::StopSignals;
use crate::xen::xenstore::XsClient;
use crate::xen::DomId;
use crate::zcopy::gntdev_dmabuf::GntdevDmaBuf;
use crate::zcopy::{Capabilities, DmaBufOps, FallbackReason, ZeroCopyGate};

/// Open the real Xen interfaces of this domain.
pub fn real_platform() -> Result<Platform> {
    let mut store = XsClient::open().context("connecting to XenStore (is xenstored running?)")?;
    let domid = DomId(store.own_domid().context("reading our domain id")?);
    let evtchn = XenEvtchn::open().context("opening /dev/xen/evtchn (modprobe xen-evtchn)")?;
    let grants = Gntdev::open().context("opening /dev/xen/gntdev (modprobe xen-gntdev)")?;
    let gntalloc: Option<Arc<dyn GrantAllocator>> = match Gntalloc::open() {
        Ok(g) => {
            log_gntalloc_limit();
            Some(Arc::new(g))
        }
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

/// gntalloc grants at most `limit` pages for the whole backend domain (all guests and
/// every other gntalloc user): say so once, with how to raise it.
fn log_gntalloc_limit() {
    const PARAM: &str = "/sys/module/xen_gntalloc/parameters/limit";
    match std::fs::read_to_string(PARAM) {
        Ok(v) => info!(
            "gntalloc: at most {} pages granted at once for all be-alloc guests together \
             (raise with xen_gntalloc.limit=N on the kernel command line, or \
             `echo N > {PARAM}`)",
            v.trim()
        ),
        Err(e) => info!("gntalloc: global grant limit unknown ({PARAM}: {e})"),
    }
}

/// The zero-copy gate for `policy`, after probing gntdev's dma-buf ioctls. Only an
/// output that shows foreign memory (KMS; Wayland through `zwp_linux_dmabuf_v1`, guest
/// buffers only: it has no dumb buffers for be-alloc) can use zero-copy; `on` without it, or
/// without the kernel support, is an error. Logs once what will run.
pub fn zero_copy_gate(policy: ZeroCopy, output: OutputKind) -> Result<ZeroCopyGate> {
    if policy == ZeroCopy::Off {
        info!("zero-copy off (--zero-copy off): every frame is copied");
        return Ok(ZeroCopyGate::off());
    }
    if !matches!(output, OutputKind::Kms | OutputKind::Wayland) {
        if policy == ZeroCopy::On {
            bail!("--zero-copy on needs the KMS or Wayland output ({output:?} copies every frame)");
        }
        info!("zero-copy unavailable with the {output:?} output: every frame is copied");
        return Ok(ZeroCopyGate::off());
    }
    let (ops, caps): (Option<Arc<dyn DmaBufOps>>, Capabilities) =
        match GntdevDmaBuf::open(Path::new("/dev/xen/gntdev")) {
            Ok(g) => {
                let mut caps = Capabilities::probe_system(&g);
                if output == OutputKind::Wayland && caps.import.is_ok() {
                    caps.import = Err(FallbackReason::BackendAlloc(
                        "the Wayland output has no dumb buffers (be-alloc copies)".into(),
                    ));
                }
                (Some(Arc::new(g)), caps)
            }
            Err(e) => {
                warn!("opening /dev/xen/gntdev for dma-bufs: {e}");
                (None, Capabilities::none(FallbackReason::NoGntdev))
            }
        };
    let gate = ZeroCopyGate::new(policy, ops, &caps)
        .map_err(|why| anyhow!("--zero-copy on, but zero-copy is unavailable: {why}"))?;
    let state = |off: Option<&FallbackReason>| match off {
        None => "available".to_string(),
        Some(why) => format!("off ({why})"),
    };
    // The same as fields (`available` or a FallbackReason code) for the harness.
    let code = |off: Option<&FallbackReason>| off.map_or("available", FallbackReason::code);
    info!(
        zc_policy = ?policy,
        zc_guest = %code(gate.export_disabled()),
        zc_bealloc = %code(gate.import_disabled()),
        "zero-copy {policy:?}: guest buffers {}, be-alloc buffers {}",
        state(gate.export_disabled()),
        state(gate.import_disabled())
    );
    Ok(gate)
}

/// Where `serve` announces itself besides sd_notify (`$NOTIFY_SOCKET`): unset for the
/// default, `none` for nothing.
#[derive(Clone, Debug, Default)]
pub struct Announce {
    /// `--status-node`: default `<own domain path>/displback/status`; a relative path is
    /// under the own domain path.
    pub status_node: Option<String>,
    /// `--control-socket`: default [`crate::control::DEFAULT_SOCKET`].
    pub control_socket: Option<PathBuf>,
}

/// The status node `setting` names, for a domain whose XenStore home is `own`.
pub fn status_node_path(setting: Option<&str>, own: &str) -> Option<String> {
    match setting.map(str::trim) {
        Some("none") => None,
        Some(p) if p.starts_with('/') => Some(p.trim_end_matches('/').to_owned()),
        Some(p) if !p.is_empty() => Some(format!("{own}/{}", p.trim_end_matches('/'))),
        _ => Some(format!("{own}/displback/status")),
    }
}

/// The control socket `setting` names.
pub fn control_socket_path(setting: Option<&Path>) -> Option<PathBuf> {
    match setting {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(crate::control::DEFAULT_SOCKET)),
    }
}

/// Run the backend until SIGINT/SIGTERM.
// One argument per setting of `displback serve`, straight from main.
#[allow(clippy::too_many_arguments)]
pub fn run(
    output: OutputKind,
    opts: crate::output::OutputOptions,
    domid: Option<u16>,
    domain: Option<crate::domain_name::DomainSelector>,
    zero_copy: ZeroCopy,
    limits: Limits,
    announce: Announce,
    input: crate::input::InputConfig,
) -> Result<()> {
    let signals = StopSignals::install().context("installing signal handling")?;
    let mut plat = real_platform()?;
    info!("backend domain {}", plat.domid.0);
    let own = plat
        .store
        .get_domain_path(plat.domid.0)
        .context("reading our domain path")?;
    let status_node = status_node_path(announce.status_node.as_deref(), &own);
    let control_socket = control_socket_path(announce.control_socket.as_deref());
    let notify = crate::notify::Notifier::from_env();
    if let Some(n) = &notify {
        info!(
            "systemd notification socket set{}",
            n.watchdog()
                .map(|w| format!("; watchdog every {w:?}"))
                .unwrap_or_default()
        );
    }
    let gate = zero_copy_gate(zero_copy, output)?;
    if opts.wayland.seat_input && (input.disabled || output != OutputKind::Wayland) {
        tracing::warn!(
            "wayland seat input asked for, but {}: it has no effect",
            if input.disabled {
                "input is off (--no-input)"
            } else {
                "the output is not wayland"
            }
        );
    }
    let output = crate::output::open(output, &opts)?;
    let mut server = Server::new(
        plat,
        output,
        ServerConfig {
            only_domid: domid.map(DomId),
            only_domain: domain,
            limits,
            notify,
            status_node,
            control_socket,
            no_input: input.disabled,
        },
    )?
    .with_zero_copy(gate);
    server.stop_on_readable(signals.as_raw_fd())?;
    let stop_inputs = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inputs = if !input.disabled && !input.sources.is_empty() {
        let sources = crate::input::source::Sources::new(
            Path::new("/dev/input"),
            input.sources,
            server.input_handle(),
        );
        Some(sources.spawn(stop_inputs.clone())?)
    } else {
        None
    };
    let result = server.run();
    stop_inputs.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(t) = inputs {
        let _ = t.join();
    }
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_node_settings() {
        let own = "/local/domain/3";
        let p = |s| status_node_path(s, own);
        assert_eq!(p(None).as_deref(), Some("/local/domain/3/displback/status"));
        assert_eq!(p(Some("none")), None);
        assert_eq!(p(Some("/x/y/")).as_deref(), Some("/x/y"));
        assert_eq!(
            p(Some("data/displback-status")).as_deref(),
            Some("/local/domain/3/data/displback-status")
        );
        assert_eq!(
            control_socket_path(None),
            Some(PathBuf::from("/run/displback/control"))
        );
        assert_eq!(control_socket_path(Some(Path::new("none"))), None);
        assert_eq!(
            control_socket_path(Some(Path::new("/tmp/c"))),
            Some(PathBuf::from("/tmp/c"))
        );
    }
}
