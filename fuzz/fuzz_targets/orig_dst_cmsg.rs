//! The recvmsg control messages of a UDP datagram → its original
//! destination (`sys::orig_dst_from_cmsgs`, the pure walk recv_with_orig_dst
//! uses). Raw bytes first; then the destination found is written back as
//! the kernel would and must read back the same.
#![no_main]

use std::net::{SocketAddr, SocketAddrV6};

use libfuzzer_sys::fuzz_target;
use tproxyd::sys::{orig_dst_from_cmsgs, CMSG_SPACE};

const WORD: usize = std::mem::size_of::<usize>();
const HDR: usize = (WORD + 8).div_ceil(WORD) * WORD;

/// One control message laid out like the kernel's put_cmsg (the oracle).
fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
    let mut out = (HDR + data.len()).to_ne_bytes().to_vec();
    out.extend_from_slice(&level.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.resize(HDR, 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(WORD), 0);
    out
}

fn encode(addr: SocketAddr) -> Vec<u8> {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = (libc_af(false)).to_ne_bytes().to_vec();
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&a.ip().octets());
            b.resize(16, 0);
            cmsg(0, 20, &b) // SOL_IP, IP_ORIGDSTADDR
        }
        SocketAddr::V6(a) => {
            let mut b = (libc_af(true)).to_ne_bytes().to_vec();
            b.extend_from_slice(&a.port().to_be_bytes());
            b.extend_from_slice(&a.flowinfo().to_be_bytes());
            b.extend_from_slice(&a.ip().octets());
            b.extend_from_slice(&a.scope_id().to_ne_bytes());
            cmsg(41, 74, &b) // SOL_IPV6, IPV6_ORIGDSTADDR
        }
    }
}

fn libc_af(v6: bool) -> u16 {
    if v6 {
        10
    } else {
        2
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(found) = orig_dst_from_cmsgs(data) else {
        return;
    };
    let Some(addr) = found else {
        return;
    };
    // Never the v4-mapped form: the rest of tproxyd sees the real family.
    assert_eq!(addr.ip().to_canonical(), addr.ip(), "mapped address {addr}");

    // Written back after arbitrary other messages (the input's own first
    // bytes as a foreign message), in a zeroed buffer as the kernel leaves
    // it, the destination reads back the same.
    let mut buf = cmsg(1, 29, &data[..data.len().min(32)]); // SOL_SOCKET, SO_TIMESTAMP
    buf.extend(encode(addr));
    buf.resize(buf.len().max(CMSG_SPACE), 0);
    assert_eq!(orig_dst_from_cmsgs(&buf), Ok(Some(addr)));

    // The IPv6 form of an IPv4 destination (a dual-stack socket) comes
    // back as IPv4.
    if let SocketAddr::V4(v4) = addr {
        let mapped = SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0);
        assert_eq!(
            orig_dst_from_cmsgs(&encode(SocketAddr::V6(mapped))),
            Ok(Some(addr))
        );
    }
});
