//! Where guest input comes from: the backend domain's evdev devices ([`source`]),
//! translated per device ([`translate`]) into the backend-neutral
//! [`crate::kbdif::device::Input`]. The syscalls are in [`evdev`], the only module here
//! with `unsafe`.

pub mod evdev;
pub mod source;
pub mod translate;
pub mod uinput;

/// `displback serve`'s input settings.
#[derive(Clone, Debug, Default)]
pub struct InputConfig {
    /// `--no-input` / `input = false`: serve no vkbd devices.
    pub disabled: bool,
    /// `[[inputs]]`: which evdev device feeds which guest device.
    pub sources: Vec<source::InputSourceCfg>,
}
