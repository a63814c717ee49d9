//! nf_tables spoken over netlink: tproxyd's table installed, replaced and
//! removed without the `nft` binary. One batch (NFNL_MSG_BATCH_BEGIN …
//! END) is one kernel transaction, as an `nft -f` file is: the replace is
//! NEWTABLE, DELTABLE, NEWTABLE + chains, sets and rules, so there is no
//! instant without rules and a refused batch changes nothing.
//!
//! The encoder covers the message and expression shapes tproxyd emits
//! (uapi `linux/netfilter/nf_tables.h`); what it writes is made from the
//! same [`Ruleset`] the nft text is, and matches nft 1.0.6's bytecode
//! (tests/e2e_firewall.rs compares what the kernel holds).
//! The socket is nix's (safe) netlink socket: no C library, no `unsafe`.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use super::nft_ir::{AnonSet, Chain, ChainType, Expr, Hook, Ruleset, SetRef, Verdict};
use super::FirewallError;

// nlmsghdr flags
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

const NFPROTO_INET: u8 = 1;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

/// A nested attribute's length is a u16: the elements of one NEWSETELEM
/// stay well under it (google/nftables uses the same margin).
const MAX_ELEMS_BYTES: usize = 65_535 - 1_024;

fn msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// One netlink message under construction: nlmsghdr + nfgenmsg + attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn put_u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    fn put_str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.put(ty, &data);
    }

    fn open(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn close(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at).min(u16::MAX as usize) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// `NFTA_DATA_VALUE` inside attribute `ty`.
    fn put_value(&mut self, ty: u16, value: &[u8]) {
        self.open(ty);
        self.put(1, value);
        self.close();
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// What one message of a batch does, to name it when the kernel refuses it.
#[derive(Debug, Clone)]
struct Step {
    what: String,
    /// Expression names of a rule (for the module a refusal points at).
    exprs: Vec<&'static str>,
    /// A chain's type (nat chains need their own module).
    chain_type: Option<ChainType>,
}

/// A batch of messages and, per sequence number, what each does.
pub struct Batch {
    buf: Vec<u8>,
    first_seq: u32,
    next_seq: u32,
    steps: Vec<Step>,
    /// Test hook: an expression name sent instead of another.
    rename: Option<(&'static str, &'static str)>,
    /// Anonymous sets get batch-unique ids.
    next_set_id: u32,
}

impl Batch {
    /// How many messages the batch holds between BEGIN and END.
    pub fn messages(&self) -> usize {
        self.steps.len()
    }

    fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            first_seq: 1,
            next_seq: 1,
            steps: Vec::new(),
            rename: None,
            next_set_id: 1,
        };
        let begin = Msg::new(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        b.buf.extend_from_slice(&begin.finish());
        b
    }

    fn seq(&mut self, step: Step) -> u32 {
        let s = self.next_seq;
        self.next_seq += 1;
        self.steps.push(step);
        s
    }

    fn step(what: String) -> Step {
        Step {
            what,
            exprs: Vec::new(),
            chain_type: None,
        }
    }

    fn push(&mut self, m: Msg) {
        self.buf.extend_from_slice(&m.finish());
    }

    fn end(mut self) -> Vec<u8> {
        let seq = self.next_seq;
        let end = Msg::new(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        self.buf.extend_from_slice(&end.finish());
        self.buf
    }

    fn table(&mut self, ty: u16, flags: u16, table: &str, what: String) {
        let seq = self.seq(Batch::step(what));
        let mut m = Msg::new(msg_type(ty), NLM_F_REQUEST | flags, seq, NFPROTO_INET, 0);
        m.put_str(1, table); // NFTA_TABLE_NAME
        if ty == NFT_MSG_NEWTABLE {
            m.put_u32(2, 0); // NFTA_TABLE_FLAGS
        }
        self.push(m);
    }

    fn chain(&mut self, table: &str, chain: &Chain) {
        let mut step = Batch::step(format!("chain {}", chain.name));
        step.chain_type = Some(chain.kind);
        let seq = self.seq(step);
        let mut m = Msg::new(
            msg_type(NFT_MSG_NEWCHAIN),
            NLM_F_REQUEST | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
            0,
        );
        m.put_str(1, table); // NFTA_CHAIN_TABLE
        m.put_str(3, chain.name); // NFTA_CHAIN_NAME
        m.open(4); // NFTA_CHAIN_HOOK
        let hook = match chain.hook {
            Hook::Prerouting => 0,
            Hook::Output => 3,
        };
        m.put_u32(1, hook); // NFTA_HOOK_HOOKNUM
        m.put_u32(2, chain.priority as u32); // NFTA_HOOK_PRIORITY
        m.close();
        m.put_u32(5, 1); // NFTA_CHAIN_POLICY: NF_ACCEPT
        m.put_str(
            7, // NFTA_CHAIN_TYPE
            match chain.kind {
                ChainType::Filter => "filter",
                ChainType::Route => "route",
                ChainType::Nat => "nat",
            },
        );
        self.push(m);
    }

    /// NEWSET and its elements, split over as many NEWSETELEM messages as
    /// the u16 attribute length needs. Returns the set's batch id.
    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        table: &str,
        name: &str,
        flags: u32,
        key: super::nft_ir::KeyType,
        desc_size: Option<u32>,
        elems: &[(Vec<u8>, bool)],
        what: String,
    ) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        let seq = self.seq(Batch::step(what.clone()));
        let mut m = Msg::new(
            msg_type(NFT_MSG_NEWSET),
            NLM_F_REQUEST | NLM_F_CREATE,
            seq,
            NFPROTO_INET,
            0,
        );
        m.put_str(1, table); // NFTA_SET_TABLE
        m.put_str(2, name); // NFTA_SET_NAME
        m.put_u32(3, flags); // NFTA_SET_FLAGS
        m.put_u32(4, key.number()); // NFTA_SET_KEY_TYPE
        m.put_u32(5, key.key_len()); // NFTA_SET_KEY_LEN
        m.put_u32(10, id); // NFTA_SET_ID
        if let Some(size) = desc_size {
            m.open(9); // NFTA_SET_DESC
            m.put_u32(1, size); // NFTA_SET_DESC_SIZE
            m.close();
        }
        // nft's set userdata: NFTNL_UDATA_SET_KEYBYTEORDER (2 big, 1 host
        // endian), which `nft list` reads to print the elements.
        let order: u32 = if key.big_endian() { 2 } else { 1 };
        let mut udata = vec![0u8, 4];
        udata.extend_from_slice(&order.to_ne_bytes());
        m.put(13, &udata); // NFTA_SET_USERDATA
        self.push(m);

        let mut rest = elems;
        let mut part = 1;
        while !rest.is_empty() {
            let seq = self.seq(Batch::step(format!("{what}, elements part {part}")));
            part += 1;
            let mut m = Msg::new(
                msg_type(NFT_MSG_NEWSETELEM),
                NLM_F_REQUEST | NLM_F_CREATE,
                seq,
                NFPROTO_INET,
                0,
            );
            m.put_str(1, table); // NFTA_SET_ELEM_LIST_TABLE
            m.put_str(2, name); // NFTA_SET_ELEM_LIST_SET
            m.put_u32(4, id); // NFTA_SET_ELEM_LIST_SET_ID
            m.open(3); // NFTA_SET_ELEM_LIST_ELEMENTS
            let start = m.buf.len();
            let mut used = 0;
            for (key, end) in rest {
                if m.buf.len() - start > MAX_ELEMS_BYTES {
                    break;
                }
                m.open(1); // NFTA_LIST_ELEM
                m.put_value(1, key); // NFTA_SET_ELEM_KEY
                if *end {
                    m.put_u32(3, NFT_SET_ELEM_INTERVAL_END); // NFTA_SET_ELEM_FLAGS
                }
                m.close();
                used += 1;
            }
            m.close();
            self.push(m);
            rest = rest.get(used..).unwrap_or_default();
        }
        id
    }

    fn anon_set(&mut self, table: &str, set: &AnonSet, rule: &str) -> u32 {
        let (flags, elems): (u32, Vec<(Vec<u8>, bool)>) = if set.interval {
            let width = set.key.key_len() as usize;
            let as_int = |b: &[u8]| b.iter().fold(0u128, |acc, x| (acc << 8) | u128::from(*x));
            let ranges = set
                .elems
                .iter()
                .map(|(a, b)| (as_int(a), as_int(b)))
                .collect();
            (
                NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_INTERVAL,
                super::nft_ir::interval_elements(ranges, width),
            )
        } else {
            (
                NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
                set.elems.iter().map(|(a, _)| (a.clone(), false)).collect(),
            )
        };
        let size = elems.len() as u32;
        self.set(
            table,
            "__set%d",
            flags,
            set.key,
            Some(size),
            &elems,
            format!("the anonymous set of rule `{rule}`"),
        )
    }

    fn rule(&mut self, table: &str, chain: &Chain, index: usize) {
        let Some(rule) = chain.rules.get(index) else {
            return;
        };
        let text = rule.to_string();
        let lowered = rule.lower();
        let ids: Vec<u32> = lowered
            .anon_sets
            .iter()
            .map(|s| self.anon_set(table, s, &text))
            .collect();
        let mut step = Batch::step(format!(
            "rule {} of chain {} (`{text}`)",
            index + 1,
            chain.name
        ));
        step.exprs = lowered.exprs.iter().map(Expr::name).collect();
        let seq = self.seq(step);
        let mut m = Msg::new(
            msg_type(NFT_MSG_NEWRULE),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND,
            seq,
            NFPROTO_INET,
            0,
        );
        m.put_str(1, table); // NFTA_RULE_TABLE
        m.put_str(2, chain.name); // NFTA_RULE_CHAIN
        m.open(4); // NFTA_RULE_EXPRESSIONS
        for e in &lowered.exprs {
            self.expr(&mut m, e, &ids);
        }
        m.close();
        self.push(m);
    }

    fn expr(&self, m: &mut Msg, e: &Expr, set_ids: &[u32]) {
        let name = match self.rename {
            Some((from, to)) if from == e.name() => to,
            _ => e.name(),
        };
        m.open(1); // NFTA_LIST_ELEM
        m.put_str(1, name); // NFTA_EXPR_NAME
        m.open(2); // NFTA_EXPR_DATA
        match e {
            Expr::MetaLoad { key, dreg } => {
                m.put_u32(2, *key); // NFTA_META_KEY
                m.put_u32(1, *dreg); // NFTA_META_DREG
            }
            Expr::MetaSet { key, sreg } => {
                m.put_u32(2, *key);
                m.put_u32(3, *sreg); // NFTA_META_SREG
            }
            Expr::Cmp { sreg, op, data } => {
                m.put_u32(1, *sreg); // NFTA_CMP_SREG
                m.put_u32(2, op.number()); // NFTA_CMP_OP
                m.put_value(3, data); // NFTA_CMP_DATA
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                m.put_u32(1, *dreg); // NFTA_PAYLOAD_DREG
                m.put_u32(2, *base); // NFTA_PAYLOAD_BASE
                m.put_u32(3, *offset); // NFTA_PAYLOAD_OFFSET
                m.put_u32(4, *len); // NFTA_PAYLOAD_LEN
            }
            Expr::Bitwise {
                reg,
                len,
                mask,
                xor,
            } => {
                m.put_u32(1, *reg); // NFTA_BITWISE_SREG
                m.put_u32(2, *reg); // NFTA_BITWISE_DREG
                m.put_u32(3, *len); // NFTA_BITWISE_LEN
                m.put_value(4, mask); // NFTA_BITWISE_MASK
                m.put_value(5, xor); // NFTA_BITWISE_XOR
            }
            Expr::Immediate { dreg, data } => {
                m.put_u32(1, *dreg); // NFTA_IMMEDIATE_DREG
                m.put_value(2, data); // NFTA_IMMEDIATE_DATA
            }
            Expr::Verdict(v) => {
                m.put_u32(1, super::nft_ir::REG_VERDICT);
                m.open(2); // NFTA_IMMEDIATE_DATA
                m.open(2); // NFTA_DATA_VERDICT
                let code: i32 = match v {
                    Verdict::Drop => 0,
                    Verdict::Accept => 1,
                    Verdict::Return => -5,
                };
                m.put(1, &code.to_be_bytes()); // NFTA_VERDICT_CODE
                m.close();
                m.close();
            }
            Expr::Lookup { set, sreg, invert } => {
                match set {
                    SetRef::Named(name) => m.put_str(1, name), // NFTA_LOOKUP_SET
                    SetRef::Anon(i) => {
                        m.put_str(1, "__set%d");
                        if let Some(id) = set_ids.get(*i) {
                            m.put_u32(4, *id); // NFTA_LOOKUP_SET_ID
                        }
                    }
                }
                m.put_u32(2, *sreg); // NFTA_LOOKUP_SREG
                if *invert {
                    m.put_u32(5, 1); // NFTA_LOOKUP_FLAGS: NFT_LOOKUP_F_INV
                }
            }
            Expr::Socket { key, dreg } => {
                m.put_u32(1, *key); // NFTA_SOCKET_KEY
                m.put_u32(2, *dreg); // NFTA_SOCKET_DREG
            }
            Expr::Fib {
                result,
                flags,
                dreg,
            } => {
                m.put_u32(1, *dreg); // NFTA_FIB_DREG
                m.put_u32(2, *result); // NFTA_FIB_RESULT
                m.put_u32(3, *flags); // NFTA_FIB_FLAGS
            }
            Expr::Ct { key, dreg } => {
                m.put_u32(2, *key); // NFTA_CT_KEY
                m.put_u32(1, *dreg); // NFTA_CT_DREG
            }
            Expr::Counter => {
                m.put(1, &0u64.to_be_bytes()); // NFTA_COUNTER_BYTES
                m.put(2, &0u64.to_be_bytes()); // NFTA_COUNTER_PACKETS
            }
            Expr::Tproxy {
                family,
                reg_addr,
                reg_port,
            } => {
                m.put_u32(1, *family); // NFTA_TPROXY_FAMILY
                if let Some(r) = reg_addr {
                    m.put_u32(2, *r); // NFTA_TPROXY_REG_ADDR
                }
                m.put_u32(3, *reg_port); // NFTA_TPROXY_REG_PORT
            }
            Expr::Redir { reg_proto_min } => {
                m.put_u32(1, *reg_proto_min); // NFTA_REDIR_REG_PROTO_MIN
                m.put_u32(3, 0x2); // NFTA_REDIR_FLAGS: NF_NAT_RANGE_PROTO_SPECIFIED
            }
        }
        m.close();
        m.close();
    }
}

/// The replace-without-destroy batch: create the table if missing, delete
/// it (whatever an earlier run left), write it anew.
pub fn replace_batch(ruleset: &Ruleset) -> Batch {
    batch_for(ruleset, None)
}

fn batch_for(ruleset: &Ruleset, rename: Option<(&'static str, &'static str)>) -> Batch {
    let t = ruleset.table;
    let mut b = Batch::new();
    b.rename = rename;
    b.table(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        t,
        format!("table inet {t} (create if missing)"),
    );
    b.table(NFT_MSG_DELTABLE, 0, t, format!("delete table inet {t}"));
    b.table(NFT_MSG_NEWTABLE, NLM_F_CREATE, t, format!("table inet {t}"));
    // nft's order: chains, then sets and their elements, then rules.
    for chain in &ruleset.chains {
        b.chain(t, chain);
    }
    for set in &ruleset.sets {
        let (key, width, v4) = match set.family {
            super::nft_ir::Family::V4 => (super::nft_ir::KeyType::Ipv4Addr, 4, true),
            super::nft_ir::Family::V6 => (super::nft_ir::KeyType::Ipv6Addr, 16, false),
        };
        let ranges = crate::policy::rule_set::cidr::sorted_ranges(&set.elems, v4);
        let elems = super::nft_ir::interval_elements(ranges, width);
        b.set(
            t,
            &set.name,
            NFT_SET_INTERVAL,
            key,
            None,
            &elems,
            format!("set {} ({} prefixes)", set.name, set.elems.len()),
        );
    }
    for chain in &ruleset.chains {
        for i in 0..chain.rules.len() {
            b.rule(t, chain, i);
        }
    }
    b
}

/// A netlink socket to nf_tables, bound, with buffers sized for `batch`.
fn open(batch_len: usize) -> Result<OwnedFd, FirewallError> {
    let fail = |what: &str, e: Errno| FirewallError::Tool {
        tool: "nftables netlink",
        detail: format!("{what}: {e}"),
    };
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| fail("cannot open a NETLINK_NETFILTER socket", e))?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
        .map_err(|e| fail("cannot bind the netlink socket", e))?;
    // One batch is one datagram: the send buffer must hold it whole.
    // SO_SNDBUFFORCE passes wmem_max with CAP_NET_ADMIN (which changing
    // the ruleset needs anyway); without it the plain option may suffice.
    let want = batch_len + 65_536;
    if socket::setsockopt(&fd, sockopt::SndBufForce, &want).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &want);
    }
    let rcv = 4 << 20;
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &rcv).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &rcv);
    }
    Ok(fd)
}

/// One message the kernel sent back.
struct Reply<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

fn replies(buf: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(hdr) = buf.get(at..at + 16) {
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < 16 {
            break;
        }
        let ty = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let seq = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let Some(payload) = buf.get(at + 16..at + len) else {
            break;
        };
        out.push(Reply { ty, seq, payload });
        at += (len + 3) & !3;
    }
    out
}

/// NLMSG_ERROR's payload: the (negative) errno and the request's header.
fn error_of(payload: &[u8]) -> Option<(i32, u32)> {
    let code = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    let seq = u32::from_ne_bytes(payload.get(12..16)?.try_into().ok()?);
    Some((code, seq))
}

/// Sends `bytes`, then a GETGEN request, and collects every error the
/// kernel reported before answering it: netlink requests are handled in
/// order, so the batch's errors all come before the GETGEN reply.
fn talk(fd: &OwnedFd, bytes: &[u8], sync_seq: u32) -> Result<Vec<(i32, u32)>, FirewallError> {
    let io = |what: &str, e: Errno| FirewallError::Tool {
        tool: "nftables netlink",
        detail: format!("{what}: {e}"),
    };
    socket::send(fd.as_raw_fd(), bytes, MsgFlags::empty()).map_err(|e| match e {
        Errno::EPERM => FirewallError::Rejected {
            tool: "nftables netlink",
            detail: "Operation not permitted (needs CAP_NET_ADMIN: run as root)".into(),
        },
        e => io("cannot send the batch", e),
    })?;
    let getgen = Msg::new(msg_type(NFT_MSG_GETGEN), NLM_F_REQUEST, sync_seq, 0, 0).finish();
    socket::send(fd.as_raw_fd(), &getgen, MsgFlags::empty())
        .map_err(|e| io("cannot send GETGEN", e))?;
    let mut errors = Vec::new();
    let mut buf = vec![0u8; 1 << 17];
    // Each error echoes the refused message: many refused set-element
    // messages can overflow the receive buffer (ENOBUFS), and the GETGEN
    // answer may be among what was dropped. The kernel handled the whole
    // batch before send() returned, so what is queued is all there is.
    let mut flags = MsgFlags::empty();
    loop {
        let n = match socket::recv(fd.as_raw_fd(), &mut buf, flags) {
            Ok(n) => n,
            Err(Errno::ENOBUFS) => {
                flags = MsgFlags::MSG_DONTWAIT;
                errors.push((-(Errno::ENOBUFS as i32), u32::MAX));
                continue;
            }
            Err(Errno::EAGAIN) if flags == MsgFlags::MSG_DONTWAIT => return Ok(errors),
            Err(e) => return Err(io("cannot read the kernel's answer", e)),
        };
        for r in replies(buf.get(..n).unwrap_or_default()) {
            if r.ty == NLMSG_ERROR {
                if let Some((code, seq)) = error_of(r.payload) {
                    if seq == sync_seq {
                        return Ok(errors);
                    }
                    if code != 0 {
                        errors.push((code, seq));
                    }
                }
            } else if r.seq == sync_seq && r.ty == msg_type(NFT_MSG_NEWGEN) {
                return Ok(errors);
            }
        }
    }
}

/// The kernel module that provides expression `name`, and its config.
fn module_of(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "tproxy" => ("nft_tproxy", "CONFIG_NFT_TPROXY"),
        "socket" => ("nft_socket", "CONFIG_NFT_SOCKET"),
        "fib" => ("nft_fib_inet", "CONFIG_NFT_FIB_INET"),
        "ct" => ("nft_ct", "CONFIG_NFT_CT"),
        "redir" => ("nft_redir", "CONFIG_NFT_REDIR"),
        "counter" => ("nft_counter", "CONFIG_NFT_COUNTER"),
        _ => return None,
    })
}

fn explain(step: &Step, code: i32) -> String {
    let errno = Errno::from_raw(-code);
    let mut text = format!("the kernel refused {}: {}", step.what, errno.desc());
    let missing = matches!(errno, Errno::ENOENT | Errno::EOPNOTSUPP);
    if missing && !step.exprs.is_empty() {
        let mut mods: Vec<String> = Vec::new();
        let mut unknown: Vec<&str> = Vec::new();
        for name in &step.exprs {
            match module_of(name) {
                Some((m, c)) => {
                    let t = format!("{m} ({c})");
                    if !mods.contains(&t) {
                        mods.push(t);
                    }
                }
                None if !["meta", "cmp", "payload", "bitwise", "immediate", "lookup"]
                    .contains(name) =>
                {
                    unknown.push(name)
                }
                None => {}
            }
        }
        if !unknown.is_empty() {
            text.push_str(&format!(
                "\n(the kernel has no nf_tables expression {}: load its module, e.g. `modprobe nft_{}`, or build the kernel with it)",
                unknown.join(", "),
                unknown.first().copied().unwrap_or_default()
            ));
        } else if !mods.is_empty() {
            let names: Vec<&str> = mods.iter().filter_map(|m| m.split(' ').next()).collect();
            text.push_str(&format!(
                "\n(the kernel lacks a module this rule needs: {}; load it with `modprobe {}` (OpenWrt: opkg install kmod-nft-tproxy kmod-nft-socket), or build the kernel with it; tproxy needs Linux >= 4.19; run tproxyd doctor, or use --firewall iptables)",
                mods.join(", "),
                names.join(" ")
            ));
        }
    } else if missing && step.chain_type == Some(ChainType::Nat) {
        text.push_str(
            "\n(nat chains need nft_chain_nat (CONFIG_NFT_NAT): `modprobe nft_chain_nat`)",
        );
    } else if missing && step.what.starts_with("table") {
        text.push_str("\n(the kernel has no nf_tables inet family: `modprobe nf_tables` (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET))");
    } else if errno == Errno::EPERM {
        text.push_str("\n(needs CAP_NET_ADMIN: run as root)");
    }
    text
}

/// Sends a whole batch; Ok when the kernel committed it, else an error
/// naming the first message it refused (nothing of the batch is applied).
fn commit(batch: Batch) -> Result<(), FirewallError> {
    let steps = batch.steps.clone();
    let first = batch.first_seq;
    let sync = batch.next_seq + 1;
    let bytes = batch.end();
    let fd = open(bytes.len())?;
    let mut errors = talk(&fd, &bytes, sync)?;
    let overflowed = errors.iter().any(|(_, seq)| *seq == u32::MAX);
    // The overflow marker only counts when no real refusal was read.
    if errors.iter().any(|(_, seq)| *seq != u32::MAX) {
        errors.retain(|(_, seq)| *seq != u32::MAX);
    }
    let Some((code, seq)) = errors.first().copied() else {
        return Ok(());
    };
    let detail = match seq.checked_sub(first).and_then(|i| steps.get(i as usize)) {
        Some(step) => explain(step, code),
        // The batch as a whole: no nf_tables subsystem in this kernel.
        None if matches!(
            Errno::from_raw(-code),
            Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT | Errno::ENOENT
        ) =>
        {
            return Err(FirewallError::Tool {
                tool: "nftables netlink",
                detail: format!(
                    "the kernel has no nf_tables ({}): modprobe nf_tables (CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET), or use --firewall iptables",
                    Errno::from_raw(-code).desc()
                ),
            })
        }
        None if seq == u32::MAX => {
            "the kernel refused the batch, and its answers overflowed the receive buffer before the refused message could be read".to_string()
        }
        None => format!(
            "the kernel refused the batch: {}",
            Errno::from_raw(-code).desc()
        ),
    };
    let more = errors.len() - 1;
    let detail = if more > 0 {
        let at_least = if overflowed { "at least " } else { "" };
        format!("{detail}\n({at_least}{more} later message(s) of the batch were refused too; nothing was applied)")
    } else {
        format!("{detail}\n(nothing was applied)")
    };
    Err(FirewallError::Rejected {
        tool: "nftables netlink",
        detail,
    })
}

/// Installs `ruleset`, replacing an earlier table of the same name in the
/// same transaction.
pub fn apply(ruleset: &Ruleset) -> Result<(), FirewallError> {
    commit(replace_batch(ruleset))
}

/// Test hook: applies `ruleset` with expression `from` sent under the
/// name `to`, as a kernel lacking an expression would see it.
#[doc(hidden)]
pub fn apply_renaming(
    ruleset: &Ruleset,
    from: &'static str,
    to: &'static str,
) -> Result<(), FirewallError> {
    commit(batch_for(ruleset, Some((from, to))))
}

/// Deletes table `inet NAME`; Ok(false) when there was none.
pub fn delete_table(name: &str) -> Result<bool, FirewallError> {
    let mut b = Batch::new();
    b.table(
        NFT_MSG_DELTABLE,
        0,
        name,
        format!("delete table inet {name}"),
    );
    match commit(b) {
        Ok(()) => Ok(true),
        Err(FirewallError::Rejected { detail, .. }) if detail.contains(Errno::ENOENT.desc()) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Whether table `inet NAME` exists.
pub fn table_exists(name: &str) -> Result<bool, FirewallError> {
    let mut m = Msg::new(
        msg_type(NFT_MSG_GETTABLE),
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        NFPROTO_INET,
        0,
    );
    m.put_str(1, name);
    let bytes = m.finish();
    let fd = open(bytes.len())?;
    let errors = talk(&fd, &bytes, 2)?;
    match errors.first() {
        None => Ok(true),
        Some((code, _)) if -code == Errno::ENOENT as i32 => Ok(false),
        Some((code, _)) => Err(FirewallError::Rejected {
            tool: "nftables netlink",
            detail: format!(
                "cannot read table inet {name}: {}",
                Errno::from_raw(-code).desc()
            ),
        }),
    }
}

/// The kernel's support for the expressions tproxyd needs, checked with
/// a batch that is never committed (no BATCH_END: the kernel aborts it
/// after checking every message). Err names what is missing.
pub fn probe(ruleset: &Ruleset) -> Result<(), FirewallError> {
    let b = batch_for(ruleset, None);
    let steps = b.steps.clone();
    let first = b.first_seq;
    let sync = b.next_seq + 1;
    let bytes = b.buf;
    let fd = open(bytes.len())?;
    let errors = talk(&fd, &bytes, sync)?;
    match errors.first() {
        None => Ok(()),
        Some((code, seq)) => Err(FirewallError::Rejected {
            tool: "nftables netlink",
            detail: match seq.checked_sub(first).and_then(|i| steps.get(i as usize)) {
                Some(step) => explain(step, *code),
                None => Errno::from_raw(-code).desc().to_string(),
            },
        }),
    }
}

/// The capture statements of table `inet NAME`'s rules, as nft prints
/// them (`meta nfproto ipv4 tproxy ip to 127.0.0.1:1090`, `redirect to
/// :1090`), one per line; None when the table does not exist. What
/// `tproxyd doctor` checks the installed rules with, without `nft`.
pub fn capture_listing(name: &str) -> Result<Option<String>, FirewallError> {
    if !table_exists(name)? {
        return Ok(None);
    }
    let mut m = Msg::new(
        msg_type(NFT_MSG_GETRULE),
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        NFPROTO_INET,
        0,
    );
    m.put_str(1, name); // NFTA_RULE_TABLE
    let bytes = m.finish();
    let fd = open(bytes.len())?;
    socket::send(fd.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(|e| FirewallError::Tool {
        tool: "nftables netlink",
        detail: format!("cannot ask for the rules: {e}"),
    })?;
    let mut out = String::new();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| {
            FirewallError::Tool {
                tool: "nftables netlink",
                detail: format!("cannot read the rules: {e}"),
            }
        })?;
        if n == 0 {
            return Ok(Some(out));
        }
        for r in replies(buf.get(..n).unwrap_or_default()) {
            match r.ty {
                NLMSG_DONE => return Ok(Some(out)),
                NLMSG_ERROR => {
                    if let Some((code, _)) = error_of(r.payload) {
                        if code != 0 {
                            return Err(FirewallError::Rejected {
                                tool: "nftables netlink",
                                detail: format!(
                                    "cannot list the rules: {}",
                                    Errno::from_raw(-code).desc()
                                ),
                            });
                        }
                    }
                }
                t if t == msg_type(NFT_MSG_NEWRULE) => {
                    if let Some(line) = r.payload.get(4..).and_then(describe_capture) {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
                _ => {}
            }
        }
    }
}

/// Attributes of a netlink attribute stream: (type without flags, data).
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while let Some(h) = buf.get(0..4) {
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let ty = u16::from_ne_bytes([h[2], h[3]]) & 0x3fff;
        if len < 4 {
            break;
        }
        let Some(data) = buf.get(4..len) else { break };
        out.push((ty, data));
        buf = buf.get((len + 3) & !3..).unwrap_or_default();
    }
    out
}

fn find<'a>(list: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    list.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d)
}

fn be32(data: Option<&[u8]>) -> Option<u32> {
    Some(u32::from_be_bytes(data?.get(0..4)?.try_into().ok()?))
}

/// A rule's tproxy/redir statement with the family narrowing before it,
/// decoded from its expressions; None for other rules.
fn describe_capture(rule_attrs: &[u8]) -> Option<String> {
    let top = attrs(rule_attrs);
    let exprs = attrs(find(&top, 4)?); // NFTA_RULE_EXPRESSIONS
    let mut regs: [Option<Vec<u8>>; 3] = [None, None, None];
    let mut last_meta: Option<u32> = None;
    let mut nfproto: Option<u8> = None;
    for (_, elem) in exprs {
        let e = attrs(elem);
        let name = find(&e, 1)?;
        let name = std::str::from_utf8(name).ok()?.trim_end_matches('\0');
        let data = attrs(find(&e, 2).unwrap_or_default());
        match name {
            "meta" => last_meta = be32(find(&data, 2)),
            "cmp" => {
                let value = attrs(find(&data, 3).unwrap_or_default());
                if last_meta == Some(super::nft_ir::META_NFPROTO) {
                    nfproto = find(&value, 1).and_then(|v| v.first().copied());
                }
                last_meta = None;
            }
            "immediate" => {
                let reg = be32(find(&data, 1))? as usize;
                let value = attrs(find(&data, 2).unwrap_or_default());
                if let (Some(slot), Some(v)) = (regs.get_mut(reg), find(&value, 1)) {
                    *slot = Some(v.to_vec());
                }
            }
            "tproxy" => {
                let family = be32(find(&data, 1)).unwrap_or(0);
                let reg = |ty| {
                    be32(find(&data, ty)).and_then(|r| regs.get(r as usize).cloned().flatten())
                };
                let port = reg(3)?;
                let port = u16::from_be_bytes(port.get(0..2)?.try_into().ok()?);
                let addr = reg(2).and_then(|a| match a.len() {
                    4 => <[u8; 4]>::try_from(a.as_slice())
                        .ok()
                        .map(|o| std::net::IpAddr::from(o).to_string()),
                    16 => <[u8; 16]>::try_from(a.as_slice())
                        .ok()
                        .map(|o| format!("[{}]", std::net::IpAddr::from(o))),
                    _ => None,
                });
                let fam = match family {
                    2 => "ip ",
                    10 => "ip6 ",
                    _ => "",
                };
                let pre = match nfproto {
                    Some(2) => "meta nfproto ipv4 ",
                    Some(10) => "meta nfproto ipv6 ",
                    _ => "",
                };
                return Some(format!(
                    "{pre}tproxy {fam}to {}:{port}",
                    addr.unwrap_or_default()
                ));
            }
            "redir" => {
                let reg = be32(find(&data, 1))? as usize;
                let port = regs.get(reg).cloned().flatten()?;
                let port = u16::from_be_bytes(port.get(0..2)?.try_into().ok()?);
                return Some(format!("redirect to :{port}"));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::tests::plan_for;

    #[test]
    fn messages_are_aligned_and_nested_lengths_cover_their_children() {
        let mut m = Msg::new(msg_type(NFT_MSG_NEWRULE), NLM_F_REQUEST, 7, 1, 0);
        m.put_str(1, "t");
        m.open(4);
        m.put_u32(1, 5);
        m.close();
        let b = m.finish();
        assert_eq!(b.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        let top = attrs(&b[20..]);
        assert_eq!(top[0], (1, &b"t\0"[..]));
        assert_eq!(top[1].0, 4);
        assert_eq!(attrs(top[1].1), vec![(1, &5u32.to_be_bytes()[..])]);
    }

    #[test]
    fn a_big_set_is_split_under_the_attribute_limit() {
        let mut plan = plan_for("lan_interfaces = [\"br-lan\"]\n");
        // 40k /32 prefixes with gaps: 80k kernel elements.
        plan.bypass_v4 = (0..40_000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0b00_0000 + i * 2);
                format!("{ip}/32")
            })
            .collect();
        let rs = crate::firewall::nft::ruleset(&plan).unwrap();
        let b = replace_batch(&rs);
        let parts = b
            .steps
            .iter()
            .filter(|s| s.what.starts_with("set bypass_v4 ") && s.what.contains("elements part"))
            .count();
        assert!((20..40).contains(&parts), "{parts} messages");
        let bytes = b.end();
        // Every message and every attribute length is consistent.
        let msgs = replies(&bytes);
        let total: usize = msgs.iter().map(|m| (m.payload.len() + 16 + 3) & !3).sum();
        assert_eq!(total, bytes.len());
        for m in msgs.iter().filter(|m| m.ty == msg_type(NFT_MSG_NEWSETELEM)) {
            let top = attrs(&m.payload[4..]);
            let elems = find(&top, 3).unwrap();
            assert!(elems.len() < 65_535);
        }
    }

    #[test]
    fn a_refused_rule_names_its_module() {
        let step = Step {
            what: "rule 7 of chain prerouting (`meta l4proto tcp tproxy to :1090 accept`)".into(),
            exprs: vec!["meta", "cmp", "immediate", "tproxy", "immediate"],
            chain_type: None,
        };
        let text = explain(&step, -(Errno::ENOENT as i32));
        assert!(text.contains("modprobe nft_tproxy"), "{text}");
        assert!(text.contains("CONFIG_NFT_TPROXY"), "{text}");
        assert!(text.contains("rule 7 of chain prerouting"), "{text}");
    }

    /// The reader of the kernel's rule dumps takes any bytes without
    /// panicking: every truncation and a byte flipped at each offset.
    #[test]
    fn rule_readers_survive_cut_and_damaged_messages() {
        let plan = crate::firewall::tests::plan_for("lan_interfaces = [\"eth1\"]\n");
        let bytes = replace_batch(&crate::firewall::nft::ruleset(&plan).unwrap()).end();
        let rule = replies(&bytes)
            .into_iter()
            .find(|m| m.ty == msg_type(NFT_MSG_NEWRULE) && m.payload.len() > 100)
            .map(|m| m.payload.to_vec())
            .unwrap();
        for cut in 0..rule.len() {
            let _ = describe_capture(&rule[..cut]);
            let _ = replies(&bytes[..cut]);
            let mut damaged = rule.clone();
            damaged[cut] ^= 0xa5;
            let _ = describe_capture(&damaged);
            let _ = error_of(&rule[..cut]);
        }
    }

    #[test]
    fn capture_statements_are_read_back_from_rule_attributes() {
        let plan = crate::firewall::tests::plan_with(
            "listen = \"127.0.0.1:1090\"\n",
            "lan_interfaces = [\"eth1\"]\n",
        );
        let rs = crate::firewall::nft::ruleset(&plan).unwrap();
        let b = replace_batch(&rs);
        let bytes = b.end();
        let lines: Vec<String> = replies(&bytes)
            .iter()
            .filter(|m| m.ty == msg_type(NFT_MSG_NEWRULE))
            .filter_map(|m| describe_capture(&m.payload[4..]))
            .collect();
        assert_eq!(
            lines,
            [
                "meta nfproto ipv4 tproxy ip to 127.0.0.1:1090",
                "meta nfproto ipv4 tproxy ip to 127.0.0.1:1090"
            ]
        );
    }
}
