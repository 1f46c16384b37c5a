//! Page directories (displif.h "Shared buffer"): a chain of granted pages, each
//! `{ u32 gref_dir_next_page; u32 gref[1023]; }`, naming the buffer's grant refs.
//!
//! The walk is bounded by the number of refs the buffer size implies: we read exactly
//! `ceil(n / 1023)` directory pages, reject a chain that ends early or comes back to a
//! page already visited, and reject grant ref 0 anywhere. A ref named twice (in the
//! buffer, or as both a directory page and a buffer page) is refused too: Linux never
//! repeats one, and each repeat would cost another grant mapping (Xen's maptrack is
//! shared with every other backend of the domain).

use std::collections::HashSet;

use crate::xen::mem::MappedRegion;
use crate::xen::platform::{GrantMapper, PAGE_SIZE};
use crate::xen::{DomId, GrantRef, XenError};

use super::wire::pgdir;

/// Why a page directory was refused. All map to `-EINVAL` except mapping failures.
#[derive(Debug, thiserror::Error)]
pub enum PgdirError {
    #[error("grant ref 0 in the page directory")]
    ZeroRef,
    #[error("directory chain ends after {got} of {want} refs")]
    ChainTooShort { got: usize, want: usize },
    #[error("directory chain loops back to gref {0}")]
    Loop(u32),
    #[error("grant ref {0} named twice")]
    Duplicate(u32),
    #[error("mapping a directory page failed: {0}")]
    Map(#[from] XenError),
}

impl PgdirError {
    /// Positive errno for the guest's response.
    pub fn errno(&self) -> i32 {
        match self {
            PgdirError::Map(e) => match e.errno() {
                Some(libc::ENOMEM) => libc::ENOMEM,
                _ => libc::EINVAL,
            },
            _ => libc::EINVAL,
        }
    }
}

/// One mapped directory page and the refs it contributed.
struct DirPage {
    page: MappedRegion,
    refs_in_page: usize,
}

/// Number of pages a buffer of `size` bytes spans.
pub fn pages_for(size: u64) -> u64 {
    size.div_ceil(PAGE_SIZE as u64)
}

fn walk(
    grants: &dyn GrantMapper,
    dom: DomId,
    first: u32,
    count: usize,
    writable: bool,
    mut visit: impl FnMut(&DirPage, &mut Vec<GrantRef>) -> Result<(), PgdirError>,
) -> Result<(Vec<GrantRef>, HashSet<u32>), PgdirError> {
    let mut refs = Vec::with_capacity(count);
    let mut seen = HashSet::new();
    let mut next = first;
    while refs.len() < count {
        if next == 0 {
            return Err(if refs.is_empty() && first == 0 {
                PgdirError::ZeroRef
            } else {
                PgdirError::ChainTooShort {
                    got: refs.len(),
                    want: count,
                }
            });
        }
        if !seen.insert(next) {
            return Err(PgdirError::Loop(next));
        }
        let page = grants.map(dom, &[GrantRef(next)], writable)?;
        let refs_in_page = (count - refs.len()).min(pgdir::PER_PAGE);
        let dir = DirPage { page, refs_in_page };
        visit(&dir, &mut refs)?;
        let mut word = [0u8; 4];
        dir.page.read(pgdir::NEXT, &mut word).expect("in page");
        next = u32::from_ne_bytes(word);
    }
    Ok((refs, seen))
}

/// Read `count` buffer grant refs from the directory starting at `first`.
pub fn read_refs(
    grants: &dyn GrantMapper,
    dom: DomId,
    first: u32,
    count: usize,
) -> Result<Vec<GrantRef>, PgdirError> {
    let mut named = HashSet::with_capacity(count);
    let (refs, dirs) = walk(grants, dom, first, count, false, |dir, refs| {
        // One copy of the page's ref words, then validate the copy.
        let mut raw = vec![0u8; dir.refs_in_page * 4];
        dir.page.read(pgdir::GREFS, &mut raw).expect("in page");
        for w in raw.chunks_exact(4) {
            let r = u32::from_ne_bytes(w.try_into().expect("4 bytes"));
            if r == 0 {
                return Err(PgdirError::ZeroRef);
            }
            if !named.insert(r) {
                return Err(PgdirError::Duplicate(r));
            }
            refs.push(GrantRef(r));
        }
        Ok(())
    })?;
    if let Some(r) = refs.iter().find(|r| dirs.contains(&r.0)) {
        return Err(PgdirError::Duplicate(r.0));
    }
    Ok(refs)
}

/// be-alloc: write `refs` (ours, granted to the guest) into the guest's directory chain.
pub fn write_refs(
    grants: &dyn GrantMapper,
    dom: DomId,
    first: u32,
    refs: &[GrantRef],
) -> Result<(), PgdirError> {
    let mut written = 0usize;
    walk(grants, dom, first, refs.len(), true, |dir, out| {
        let chunk = &refs[written..written + dir.refs_in_page];
        let raw: Vec<u8> = chunk.iter().flat_map(|r| r.0.to_ne_bytes()).collect();
        dir.page.write(pgdir::GREFS, &raw).expect("in page");
        written += chunk.len();
        out.extend_from_slice(chunk);
        Ok(())
    })
    .map(|_| ())
}
