//! Inbounds: where captured flows arrive and their original destination
//! is recovered.
//!
//! - TCP, `tproxy` mode: the accepted socket's local address *is* the
//!   original destination (the listener is transparent).
//! - TCP, `redirect` mode: NAT rewrote the destination; it is read back
//!   from conntrack with `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`.
//! - UDP, `tproxy` mode only: each datagram carries its original
//!   destination in an `IP_RECVORIGDSTADDR` control message.

pub mod admission;
pub mod tcp;
pub mod udp;
