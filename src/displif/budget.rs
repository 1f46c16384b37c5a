//! Per-guest budgets: what one frontend domain may make the backend map, allocate and
//! grant, shared by all of that domain's devices and held across its reconnects.
//!
//! A domain's [`GuestBudget`] lives as long as the domain has a device under our backend
//! directory; it is dropped (releasing what it still retains) when the domain is gone.
//!
//! be-alloc pages are charged until the guest's access has really ended. Destroying a
//! buffer (or closing the connection) with its pages possibly still mapped by the guest
//! moves the pages to the domain's *retained* list, still charged: they are released
//! once the allocator can tell the guest unmapped them
//! ([`GrantAllocator::foreign_mapped`]), and otherwise when the domain dies. Linux's
//! gntalloc cannot tell, so on real Xen retained pages stay charged until the domain
//! dies; a later be-alloc buffer of the same size reuses them (zeroed), so a guest that
//! churns buffers honestly does not run out.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;

use crate::xen::platform::{GrantAllocator, GrantedPages, PAGE_SIZE};

/// Caps on what one guest domain may make us map or allocate (config file `[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest single display buffer (bytes).
    pub max_buffer_bytes: u64,
    /// All display buffers of the domain together, including destroyed be-alloc buffers
    /// the guest may still map (bytes).
    pub max_total_bytes: u64,
    /// Display buffers of the domain.
    pub max_buffers: usize,
    /// Framebuffers of the domain.
    pub max_fbs: usize,
    /// Guest pages mapped at once through gntdev (buffers and rings): each is an entry
    /// of Xen's maptrack table, which blkback and netback share.
    pub max_grant_mappings: usize,
    /// Refused requests per second a connection may send before it is closed (and its
    /// device held Closed for a growing back-off).
    pub max_refusals_per_sec: u32,
    /// SET_CONFIGs per second and connector (each may be a modeset); past a burst of 4
    /// they are refused with EBUSY.
    pub max_configs_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        // 4096x2047 XRGB8888 (the frontend's mode_config max) is 32 MiB.
        Limits {
            max_buffer_bytes: 64 << 20,
            max_total_bytes: 512 << 20,
            max_buffers: 128,
            max_fbs: 256,
            max_grant_mappings: (512 << 20) / PAGE_SIZE + 64,
            max_refusals_per_sec: 200,
            max_configs_per_sec: 2,
        }
    }
}

/// What a guest holds (or a charge adds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub buffers: usize,
    pub fbs: usize,
    pub grant_mappings: usize,
}

impl Usage {
    pub fn bytes(bytes: u64) -> Self {
        Usage {
            bytes,
            ..Usage::default()
        }
    }

    pub fn add(&mut self, o: &Usage) {
        self.bytes += o.bytes;
        self.buffers += o.buffers;
        self.fbs += o.fbs;
        self.grant_mappings += o.grant_mappings;
    }

    pub fn sub(&mut self, o: &Usage) {
        self.bytes = self.bytes.saturating_sub(o.bytes);
        self.buffers = self.buffers.saturating_sub(o.buffers);
        self.fbs = self.fbs.saturating_sub(o.fbs);
        self.grant_mappings = self.grant_mappings.saturating_sub(o.grant_mappings);
    }
}

/// Which limit a charge would exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error("per-guest byte budget ({0} bytes) exhausted")]
    Bytes(u64),
    #[error("per-guest display buffer budget ({0}) exhausted")]
    Buffers(usize),
    #[error("per-guest framebuffer budget ({0}) exhausted")]
    Fbs(usize),
    #[error("per-guest grant mapping budget ({0} pages) exhausted")]
    GrantMappings(usize),
}

/// Destroyed be-alloc pages the guest may still map.
struct Retained {
    pages: GrantedPages,
    bytes: u64,
}

struct State {
    used: Usage,
    retained: Vec<Retained>,
}

/// One guest domain's budget (see the module docs).
pub struct GuestBudget {
    limits: Limits,
    state: Mutex<State>,
}

impl std::fmt::Debug for GuestBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("GuestBudget")
            .field("limits", &self.limits)
            .field("used", &s.used)
            .field("retained", &s.retained.len())
            .finish()
    }
}

impl GuestBudget {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(GuestBudget {
            limits,
            state: Mutex::new(State {
                used: Usage::default(),
                retained: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the guest holds now (retained be-alloc bytes included).
    pub fn usage(&self) -> Usage {
        self.lock().used
    }

    /// Pages of destroyed be-alloc buffers still charged.
    pub fn retained_pages(&self) -> usize {
        self.lock()
            .retained
            .iter()
            .map(|r| r.pages.refs.len())
            .sum()
    }

    /// Add `u` to the guest's usage if every limit still holds.
    pub fn charge(&self, u: Usage) -> Result<(), OverBudget> {
        let l = &self.limits;
        let mut s = self.lock();
        let mut next = s.used;
        next.add(&u);
        if next.bytes > l.max_total_bytes {
            return Err(OverBudget::Bytes(l.max_total_bytes));
        }
        if next.buffers > l.max_buffers {
            return Err(OverBudget::Buffers(l.max_buffers));
        }
        if next.fbs > l.max_fbs {
            return Err(OverBudget::Fbs(l.max_fbs));
        }
        if next.grant_mappings > l.max_grant_mappings {
            return Err(OverBudget::GrantMappings(l.max_grant_mappings));
        }
        s.used = next;
        Ok(())
    }

    /// Give back what [`GuestBudget::charge`] took.
    pub fn uncharge(&self, u: Usage) {
        self.lock().used.sub(&u);
    }

    /// be-alloc pages leave their buffer: released now if `alloc` can tell the guest has
    /// no mapping of them, else kept (their `bytes` still charged).
    pub fn release_or_retain(&self, alloc: &dyn GrantAllocator, pages: GrantedPages, bytes: u64) {
        if alloc.foreign_mapped(&pages) == Some(false) {
            drop(pages);
            self.uncharge(Usage::bytes(bytes));
            return;
        }
        self.lock().retained.push(Retained { pages, bytes });
    }

    /// Release retained pages the guest has stopped mapping.
    pub fn sweep(&self, alloc: &dyn GrantAllocator) {
        let mut s = self.lock();
        let mut freed = 0;
        let mut keep = Vec::with_capacity(s.retained.len());
        for r in std::mem::take(&mut s.retained) {
            if alloc.foreign_mapped(&r.pages) == Some(false) {
                freed += r.bytes;
            } else {
                keep.push(r);
            }
        }
        s.retained = keep;
        s.used.sub(&Usage::bytes(freed));
    }

    /// Retained pages of exactly `pages` pages, zeroed and uncharged, for a new be-alloc
    /// buffer (which the caller then charges like any other).
    pub fn reuse(&self, pages: usize) -> Option<GrantedPages> {
        let mut s = self.lock();
        let i = s
            .retained
            .iter()
            .position(|r| r.pages.refs.len() == pages)?;
        let r = s.retained.swap_remove(i);
        s.used.sub(&Usage::bytes(r.bytes));
        drop(s);
        let len = r.pages.region.len();
        r.pages.region.fill(0, len, 0).expect("whole region");
        Some(r.pages)
    }

    /// Undo [`GuestBudget::reuse`] (the new buffer could not be made): retained and
    /// charged again, whatever the limits say.
    pub fn put_back(&self, pages: GrantedPages) {
        let bytes = (pages.refs.len() * PAGE_SIZE) as u64;
        let mut s = self.lock();
        s.used.add(&Usage::bytes(bytes));
        s.retained.push(Retained { pages, bytes });
    }
}
