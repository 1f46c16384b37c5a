//! The XenBus device layer, generic over device kinds: the backend side of the XenBus
//! state machine ([`device::XenbusDevice`]), the watches, hot attach/detach, frontend
//! death and toolstack removal of every device of one kind ([`set::DeviceSet`]), and the
//! routing of bound ports. A device kind (`vdispl`, `vkbd`) implements
//! [`device::DeviceKind`]; it knows its protocol, this layer knows none.

pub mod device;
pub mod set;

pub use device::{DeviceError, DeviceIds, DeviceKind, Effects, XenbusDevice, FIRST_HOLD, MAX_HOLD};
pub use set::{DeviceSet, Route, Routes};
