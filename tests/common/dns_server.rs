//! A small authoritative DNS server for the WAN namespace, over UDP and
//! TCP (RFC 7766 framing, several queries per connection): every A
//! question gets one address, every AAAA one IPv6 address (names under
//! [`NXDOMAIN_ZONE`]: NXDOMAIN with an SOA), and it records
//! who asked over which transport, so a test can prove where a query
//! went. Written here (not the library's parser) so the tests do not
//! check tproxyd against itself.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::Netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One question the server answered.
#[derive(Debug, Clone)]
pub struct Asked {
    pub transport: Transport,
    pub peer: SocketAddr,
    pub name: String,
    pub qtype: u16,
}

/// Names under this zone get NXDOMAIN with an SOA (TTL 300), whatever
/// the zone function says.
pub const NXDOMAIN_ZONE: &str = "nx.test";

/// What the server answers: the address for a name (by A or AAAA).
pub type Zone = fn(&str, u16) -> Option<IpAddr>;

pub struct DnsServer {
    pub asked: Arc<Mutex<Vec<Asked>>>,
    /// TCP connections accepted so far.
    pub tcp_connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl DnsServer {
    /// Serves UDP and TCP on each of `addrs` (port 53) inside `ns`.
    pub fn start(ns: &Netns, addrs: &[SocketAddr], zone: Zone) -> DnsServer {
        let server = DnsServer {
            asked: Arc::default(),
            tcp_connections: Arc::default(),
            stop: Arc::default(),
        };
        let sockets = ns.enter(|| {
            addrs
                .iter()
                .map(|a| {
                    let udp = UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind udp {a}: {e}"));
                    let tcp = TcpListener::bind(a).unwrap_or_else(|e| panic!("bind tcp {a}: {e}"));
                    (udp, tcp)
                })
                .collect::<Vec<_>>()
        });
        for (udp, tcp) in sockets {
            let (asked, stop) = (Arc::clone(&server.asked), Arc::clone(&server.stop));
            thread::spawn(move || {
                udp.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(reply) = answer(&buf[..n], zone, Transport::Udp, peer, &asked) {
                        let _ = udp.send_to(&reply, peer);
                    }
                }
            });
            let (asked, stop) = (Arc::clone(&server.asked), Arc::clone(&server.stop));
            let count = Arc::clone(&server.tcp_connections);
            thread::spawn(move || {
                tcp.set_nonblocking(true).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, peer)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            let asked = Arc::clone(&asked);
                            let stop = Arc::clone(&stop);
                            thread::spawn(move || serve_tcp(s, peer, zone, &asked, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        server
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

fn serve_tcp(
    mut s: TcpStream,
    peer: SocketAddr,
    zone: Zone,
    asked: &Mutex<Vec<Asked>>,
    stop: &AtomicBool,
) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = s.set_nodelay(true);
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    while !stop.load(Ordering::Relaxed) {
        let n = match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        while pending.len() >= 2 {
            let len = u16::from_be_bytes([pending[0], pending[1]]) as usize;
            if pending.len() < 2 + len {
                break;
            }
            let query: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = answer(&query, zone, Transport::Tcp, peer, asked) {
                out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                out.extend_from_slice(&reply);
            }
        }
        if !out.is_empty() && s.write_all(&out).is_err() {
            return;
        }
    }
}

/// The answer to `query`: header and question copied, one record (or
/// none when the zone has no address of that type), no additional
/// section.
fn answer(
    query: &[u8],
    zone: Zone,
    transport: Transport,
    peer: SocketAddr,
    asked: &Mutex<Vec<Asked>>,
) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let end = at + 4;
    query.get(..end)?;
    let name = labels.join(".");
    asked.lock().unwrap().push(Asked {
        transport,
        peer,
        name: name.clone(),
        qtype,
    });
    let mut reply = query[..end].to_vec();
    reply[2] = 0x84 | (query[2] & 0x01); // QR, AA, RD as asked
    reply[3] = 0x80; // RA, NOERROR
    reply[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    if name == NXDOMAIN_ZONE || name.ends_with(&format!(".{NXDOMAIN_ZONE}")) {
        // NXDOMAIN with the zone's SOA in the authority section (what
        // makes it cacheable, RFC 2308): root MNAME and RNAME, serial 1,
        // minimum 300.
        reply[3] = 0x83;
        reply[9] = 1;
        reply.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 1, 0x2c, 0, 22, 0, 0]);
        for v in [1u32, 3600, 600, 86_400, 300] {
            reply.extend_from_slice(&v.to_be_bytes());
        }
        return Some(reply);
    }
    let data = match (zone(&name, qtype), qtype) {
        (Some(IpAddr::V4(a)), 1) => a.octets().to_vec(),
        (Some(IpAddr::V6(a)), 28) => a.octets().to_vec(),
        _ => return Some(reply),
    };
    reply[7] = 1;
    reply.extend_from_slice(&[0xc0, 12]);
    reply.extend_from_slice(&qtype.to_be_bytes());
    reply.extend_from_slice(&[0, 1, 0, 0, 0x0e, 0x10]); // IN, TTL 3600
    reply.extend_from_slice(&(data.len() as u16).to_be_bytes());
    reply.extend_from_slice(&data);
    Some(reply)
}

/// A query for `name`/`qtype` with `id` (RD set).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// The addresses in a reply's answer section (as written by [`answer`]:
/// one record after the question), its id and its rcode.
pub fn parse_reply(reply: &[u8], query: &[u8]) -> Option<(u16, u8, Vec<IpAddr>)> {
    if reply.len() < query.len() || reply[12..query.len()] != query[12..] {
        return None;
    }
    let id = u16::from_be_bytes([reply[0], reply[1]]);
    let rcode = reply[3] & 0xf;
    let ancount = u16::from_be_bytes([reply[6], reply[7]]);
    let mut out = Vec::new();
    let mut at = query.len();
    for _ in 0..ancount {
        // Name (a pointer), type, class, TTL, length, data.
        let rtype = u16::from_be_bytes([*reply.get(at + 2)?, *reply.get(at + 3)?]);
        let len = u16::from_be_bytes([*reply.get(at + 10)?, *reply.get(at + 11)?]) as usize;
        let data = reply.get(at + 12..at + 12 + len)?;
        match (rtype, len) {
            (1, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (28, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        at += 12 + len;
    }
    Some((id, rcode, out))
}
