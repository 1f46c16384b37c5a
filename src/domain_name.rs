//! `displback serve --domain NAME`: serve the one guest whose XenStore `name` is NAME,
//! whatever its domid, and follow it across destroy/re-create (a new domid each time).
//!
//! Who writes `/local/domain/<N>/name`: libxl (`libxl__domain_make`), in the
//! transaction that creates `/local/domain/<N>` with permissions `n0 r<N>`: owned by
//! Dom0, the guest may only read it. A guest therefore cannot rename itself into another
//! guest's backend (the harness prints the node's permissions, `xenstore-ls -p`). We
//! still treat the value as hostile: it is read once, compared byte for byte with the
//! configured name, bounded in length, and never logged unescaped.
//!
//! Resolution needs no cache: when a device appears under our backend directory the
//! server asks [`DomainSelector::accepts`], which reads that domain's name node. A
//! domain released and re-created under the same name gets a new domid; its new device
//! is accepted, the old one's directory was removed by the toolstack. The server also
//! watches `@introduceDomain`/`@releaseDomain` so the name→domid mapping it reports is
//! current even before a device appears.

use crate::backend::xenstore::{Tx, XsClient};
use crate::backend::DomId;

/// Longest name accepted (libxl has no limit; XenStore values are <= 4096 bytes).
pub const MAX_NAME: usize = 64;

/// Why a `--domain` name is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("the domain name is empty")]
    Empty,
    #[error("the domain name is longer than {MAX_NAME} bytes")]
    TooLong,
    #[error(
        "the domain name {0:?} has a character outside [A-Za-z0-9_-] or starts with `-` \
         (it is used in XenStore paths and systemd unit names)"
    )]
    BadChar(String),
}

/// Check a name given on our command line / in an xl.cfg: it becomes part of XenStore
/// paths (the status node) and socket paths, so only a safe subset is allowed.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    // XenStore path characters are [A-Za-z0-9_@/-]; systemd instance names allow these.
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if !name.chars().all(ok) || name.starts_with('-') {
        return Err(NameError::BadChar(name.to_owned()));
    }
    Ok(())
}

/// The domain a backend serves, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSelector {
    name: String,
    /// The domid last seen with this name (for logs and status only).
    current: Option<DomId>,
}

impl DomainSelector {
    pub fn new(name: &str) -> Result<Self, NameError> {
        validate_name(name)?;
        Ok(DomainSelector {
            name: name.to_owned(),
            current: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domid the name resolved to last.
    pub fn current(&self) -> Option<DomId> {
        self.current
    }

    /// Whether `dom` is the named domain now (reads `/local/domain/<dom>/name`).
    /// A XenStore error other than a missing node keeps the last answer for `dom` (a
    /// transient failure must not close the guest's display).
    pub fn accepts(&mut self, store: &mut XsClient, dom: DomId) -> bool {
        let ok = match read_name(store, dom) {
            Ok(name) => name.is_some_and(|n| n == self.name),
            Err(e) => {
                crate::warn_limited!("reading dom{}'s name: {e}", dom.0);
                return self.current == Some(dom);
            }
        };
        if ok && self.current != Some(dom) {
            tracing::info!(
                domain = %self.name,
                "domain {} is dom{} now{}",
                self.name,
                dom.0,
                self.current
                    .map(|o| format!(" (was dom{})", o.0))
                    .unwrap_or_default()
            );
            self.current = Some(dom);
        }
        ok
    }

    /// Look the name up among all domains (after `@introduceDomain`/`@releaseDomain`):
    /// returns the domid if exactly one domain has the name, and logs changes.
    pub fn resolve(&mut self, store: &mut XsClient) -> Option<DomId> {
        let doms = store.directory(Tx::NONE, "/local/domain").ok()?;
        let mut found = doms
            .iter()
            .filter_map(|d| d.parse::<u16>().ok())
            .map(DomId)
            .filter(|&d| {
                read_name(store, d)
                    .ok()
                    .flatten()
                    .is_some_and(|n| n == self.name)
            });
        let first = found.next();
        if found.next().is_some() {
            // libxl refuses duplicate names; two at once means a rename race: wait.
            crate::warn_limited!("more than one domain is named {:?}", self.name);
            return None;
        }
        match first {
            Some(d) => {
                self.accepts(store, d);
            }
            None if self.current.is_some() => {
                tracing::info!(
                    domain = %self.name,
                    "domain {} is gone (was dom{})",
                    self.name,
                    self.current.map(|d| d.0).unwrap_or_default()
                );
                self.current = None;
            }
            None => {}
        }
        first
    }
}

/// The `name` node of `dom`, if it is there and sane (at most [`MAX_NAME`] bytes:
/// anything longer cannot equal a valid configured name anyway).
fn read_name(
    store: &mut XsClient,
    dom: DomId,
) -> Result<Option<String>, crate::backend::xenstore::XsError> {
    let v = store.read(Tx::NONE, &format!("/local/domain/{}/name", dom.0))?;
    Ok(v.filter(|v| v.len() <= MAX_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("guest-1").is_ok());
        assert!(validate_name("a_b-c").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"x".repeat(65)), Err(NameError::TooLong));
        assert!(validate_name(&"x".repeat(64)).is_ok());
        for bad in [
            "a/b", "a b", "..", "a.b", "-x", "@x", "ä", "a\0", "a\n", "${x}", "*",
        ] {
            assert!(
                matches!(validate_name(bad), Err(NameError::BadChar(_))),
                "{bad:?}"
            );
        }
    }
}
