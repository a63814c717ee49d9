//! Shadowsocks client: AEAD (SIP004) and 2022 (SIP022) methods.

pub mod crypto;
pub mod udp;
pub mod window;
