//! Relays: moving bytes between a client and its outbound once a flow is
//! set up. TCP is a pair of streams; UDP is a table of sessions.

pub mod tcp;
pub mod udp;
