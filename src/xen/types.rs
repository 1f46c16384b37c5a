//! Newtypes for the ids Xen hands around, so one can't be passed for another.

use std::fmt;

/// A Xen domain id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomId(pub u16);

/// A grant reference issued by some domain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

/// An event channel port number (local or remote, by context).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvtchnPort(pub u32);

macro_rules! id_fmt {
    ($t:ty, $name:literal) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "{}"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}
id_fmt!(DomId, "dom");
id_fmt!(GrantRef, "gref");
id_fmt!(EvtchnPort, "port");

/// XenbusState values (xen/include/public/io/xenbus.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// Parse a XenStore `state` value; anything unparsable is `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s.trim().parse::<u8>() {
            Ok(1) => Self::Initialising,
            Ok(2) => Self::InitWait,
            Ok(3) => Self::Initialised,
            Ok(4) => Self::Connected,
            Ok(5) => Self::Closing,
            Ok(6) => Self::Closed,
            Ok(7) => Self::Reconfiguring,
            Ok(8) => Self::Reconfigured,
            _ => Self::Unknown,
        }
    }

    /// The decimal string written to XenStore.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// Errors of the Xen device interfaces (real or simulated).
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl XenError {
    /// Wrap the last OS error for `op`.
    pub fn last_os(op: &'static str) -> Self {
        XenError::Io {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// The errno behind this error, if any (for guest-visible statuses).
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::Io { source, .. } => source.raw_os_error(),
            XenError::Invalid(_) => None,
        }
    }
}
