//! DNS that passes through tproxyd: the captured UDP port-53 datagrams
//! and their answers.

pub mod message;
