//! `block`: refuses on purpose. TCP flows are reset at once; UDP
//! datagrams are counted and dropped without a session.

use std::net::SocketAddr;

use serde::Deserialize;

use super::group::Member;
use super::kinds::Kind;
use super::{BuildError, Carrier, Context, DnsTransport, OutboundError, TcpUpstream, UdpUpstream};

/// `[[outbounds]] type = "block"` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub name: Option<String>,
}

/// A `block` outbound's settings: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings;

impl Kind for Settings {
    type Raw = Raw;
    type Built = Block;
    const TYPE: &'static str = "block";

    fn validate(
        _: &Raw,
        _: &str,
        _: &dyn Fn(&str) -> Option<String>,
        _: &mut dyn FnMut(&str, String),
    ) -> Settings {
        Settings
    }

    fn build(&self, _name: &str, _: &Context, _: Vec<Member>) -> Result<Block, BuildError> {
        Ok(Block)
    }
}

/// The `block` outbound. TCP: refused at once (the client gets a reset);
/// UDP: dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Block;

impl Carrier for Block {
    const UDP_HEADER: usize = 0;

    fn type_name(&self) -> &'static str {
        // One spelling: the config's `type`, from the kind's settings.
        <Settings as Kind>::TYPE
    }

    fn clash_type(&self) -> &'static str {
        "Reject"
    }

    /// It takes UDP flows, to drop them (as Clash's REJECT says).
    fn udp(&self) -> bool {
        true
    }

    fn udp_refusal(&self) -> Option<OutboundError> {
        Some(OutboundError::Blocked)
    }

    fn dns_transport(&self) -> DnsTransport {
        DnsTransport::Udp
    }

    async fn connect_tcp(
        &self,
        _dst: SocketAddr,
        _host: Option<&str>,
    ) -> Result<TcpUpstream, OutboundError> {
        Err(OutboundError::Blocked)
    }

    async fn connect_tcp_named(
        &self,
        _name: &str,
        _port: u16,
        _real: &dyn crate::outbound::ResolveReal,
    ) -> Result<TcpUpstream, OutboundError> {
        Err(OutboundError::Blocked)
    }

    async fn open_udp(&self) -> Result<UdpUpstream, OutboundError> {
        Err(OutboundError::Blocked)
    }

    /// No upstream to fail.
    async fn probe(&self) -> Result<(), OutboundError> {
        Ok(())
    }
}
