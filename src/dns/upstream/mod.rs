//! How a query reaches one named resolver (`[[dns.servers]]`).
#[cfg(feature = "dns-tls")]
pub mod https;
#[cfg(feature = "dns-tls")]
pub mod tls;
