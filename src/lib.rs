//! tproxyd: a transparent proxy for Linux routers and hosts.
//!
//! The modules follow the data path of one flow:
//!
//! ```text
//! inbound (TCP accept / UDP recvmsg, original destination)
//!   -> route (refuse loops, pick the outbound)
//!   -> outbound (direct with SO_MARK | SOCKS5 CONNECT / UDP ASSOCIATE)
//!   -> relay (TCP both ways with half-close | UDP full-cone sessions)
//! ```
//!
//! [`sys`] holds every raw system call behind safe functions; [`config`]
//! reads and validates settings; [`server`] runs an instance from binding
//! to the removal of its rules, and [`live`] is what it shares while it runs
//! (read by the API) and its reload; [`registry`] lists its
//! live flows for the logs, the API and the metrics.

// `unsafe` lives in `sys` alone, behind safe wrappers with tests: the
// compiler holds every other module to that.
#![deny(unsafe_code)]

pub mod addr;
#[cfg(feature = "api")]
pub mod api;
pub mod cidr;
pub mod config;
pub mod dns;
pub mod fds;
pub mod firewall;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod hostname;
pub mod inbound;
pub mod live;
pub mod one_or_many;
pub mod outbound;
pub mod policy;
pub mod ratelimit;
pub mod registry;
pub mod relay;
pub mod route;
pub mod server;
pub(crate) mod spares;
#[allow(unsafe_code)]
pub mod sys;
pub mod testbed;
