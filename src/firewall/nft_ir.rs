//! The one description of tproxyd's nftables table: sets, base chains and
//! rules as lists of matches and statements. Both forms tproxyd emits are
//! made from it — the nft text (`tproxyd rules print`, docs, the `nft -f`
//! input of the tests) by [`Ruleset::text`] and the kernel's expressions
//! (the netlink batch, `nft_netlink`) by [`Item::lower`] — so the two
//! cannot drift apart. Each item lowers to exactly the bytecode nft 1.0.6
//! makes of its text (`nft --debug=netlink`), including the dependencies
//! nft adds (`meta nfproto` before `ip daddr`, `meta l4proto` before
//! `tcp dport`) and its shortcuts (a one-element `{ … }` is a comparison,
//! a one-range one two comparisons).

use std::fmt::Write as _;
use std::net::IpAddr;

use super::Serves;
use crate::cidr::Cidr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// NFPROTO_IPV4 / NFPROTO_IPV6.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
}

/// `fib daddr type` values (RTN_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    Local,
    Broadcast,
    Multicast,
}

impl AddrType {
    fn rtn(self) -> u32 {
        match self {
            AddrType::Local => 2,
            AddrType::Broadcast => 3,
            AddrType::Multicast => 5,
        }
    }
    fn name(self) -> &'static str {
        match self {
            AddrType::Local => "local",
            AddrType::Broadcast => "broadcast",
            AddrType::Multicast => "multicast",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Route,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

/// One named interval set of addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub family: Family,
    pub elems: Vec<Cidr>,
}

/// One match or statement of a rule, as nft's text names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `meta mark 0xff`
    MetaMark(u32),
    /// `iifname != { "a", "b" }` (or `iifname != "lo"` without braces).
    IifnameNotIn {
        names: Vec<String>,
        braces: bool,
    },
    /// `meta nfproto ipv4`
    NfProto(Family),
    /// `meta l4proto tcp` or `meta l4proto { tcp, udp }`.
    L4Proto(Vec<Proto>),
    /// `tcp dport { 53, 6000-7000 }`; `proto` None is `th dport`.
    Dport {
        proto: Option<Proto>,
        ports: Vec<(u16, u16)>,
        braces: bool,
    },
    /// `tcp flags & (syn | ack) != syn`
    TcpFlagsNotSyn,
    /// `socket transparent 1`
    SocketTransparent,
    /// `fib daddr type local` or `fib daddr type { local, … }`.
    FibDaddrType(Vec<AddrType>),
    /// `ct status dnat`
    CtStatusDnat,
    /// `ip daddr @set`, `ip saddr != @set`.
    InSet {
        family: Family,
        source: bool,
        negate: bool,
        set: String,
    },
    Counter,
    /// `meta mark set 0x1090`
    MarkSet(u32),
    /// `tproxy [ip|ip6] to [addr]:port`
    Tproxy(Serves, u16),
    /// `redirect to :port`
    Redirect(u16),
    Verdict(Verdict),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Item>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    /// The priority as the text writes it (`mangle`, `dstnat`, `-100`).
    pub priority_text: &'static str,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: &'static str,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |items: Vec<String>, braces: bool| {
            if braces || items.len() != 1 {
                format!("{{ {} }}", items.join(", "))
            } else {
                items.concat()
            }
        };
        match self {
            Item::MetaMark(m) => write!(f, "meta mark {m:#x}"),
            Item::IifnameNotIn { names, braces } => {
                let quoted = names.iter().map(|n| format!("\"{n}\"")).collect();
                write!(f, "iifname != {}", list(quoted, *braces))
            }
            Item::NfProto(Family::V4) => f.write_str("meta nfproto ipv4"),
            Item::NfProto(Family::V6) => f.write_str("meta nfproto ipv6"),
            Item::L4Proto(protos) => {
                let names = protos.iter().map(|p| p.name().to_string()).collect();
                write!(f, "meta l4proto {}", list(names, false))
            }
            Item::Dport {
                proto,
                ports,
                braces,
            } => {
                let text = ports
                    .iter()
                    .map(|&(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                let name = proto.map_or("th", Proto::name);
                write!(f, "{name} dport {}", list(text, *braces))
            }
            Item::TcpFlagsNotSyn => f.write_str("tcp flags & (syn | ack) != syn"),
            Item::SocketTransparent => f.write_str("socket transparent 1"),
            Item::FibDaddrType(types) => {
                let names = types.iter().map(|t| t.name().to_string()).collect();
                write!(f, "fib daddr type {}", list(names, false))
            }
            Item::CtStatusDnat => f.write_str("ct status dnat"),
            Item::InSet {
                family,
                source,
                negate,
                set,
            } => write!(
                f,
                "{} {}{} @{set}",
                if *family == Family::V4 { "ip" } else { "ip6" },
                if *source { "saddr" } else { "daddr" },
                if *negate { " !=" } else { "" },
            ),
            Item::Counter => f.write_str("counter"),
            Item::MarkSet(m) => write!(f, "meta mark set {m:#x}"),
            Item::Tproxy(serves, port) => match serves {
                Serves::Both => write!(f, "tproxy to :{port}"),
                Serves::V4(None) => write!(f, "tproxy ip to :{port}"),
                Serves::V4(Some(ip)) => write!(f, "tproxy ip to {ip}:{port}"),
                Serves::V6(ip) => write!(f, "tproxy ip6 to [{ip}]:{port}"),
            },
            Item::Redirect(port) => write!(f, "redirect to :{port}"),
            Item::Verdict(Verdict::Accept) => f.write_str("accept"),
            Item::Verdict(Verdict::Drop) => f.write_str("drop"),
            Item::Verdict(Verdict::Return) => f.write_str("return"),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

impl Ruleset {
    /// The table as `nft -f` reads it (and `nft list` prints it, modulo
    /// counters and merged elements).
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "table inet {} {{", self.table);
        for set in &self.sets {
            let ty = match set.family {
                Family::V4 => "ipv4_addr",
                Family::V6 => "ipv6_addr",
            };
            let _ = writeln!(
                out,
                "\tset {} {{\n\t\ttype {ty}\n\t\tflags interval",
                set.name
            );
            if !set.elems.is_empty() {
                let elems: Vec<String> = set.elems.iter().map(Cidr::to_string).collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
        for chain in &self.chains {
            let kind = match chain.kind {
                ChainType::Filter => "filter",
                ChainType::Route => "route",
                ChainType::Nat => "nat",
            };
            let hook = match chain.hook {
                Hook::Prerouting => "prerouting",
                Hook::Output => "output",
            };
            let _ = writeln!(
                out,
                "\tchain {} {{\n\t\ttype {kind} hook {hook} priority {}; policy accept;",
                chain.name, chain.priority_text
            );
            for rule in &chain.rules {
                let _ = writeln!(out, "\t\t{rule}");
            }
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(out, "}}");
        out
    }
}

// ---- lowering to the kernel's expressions ----

/// NFT_REG_VERDICT, NFT_REG_1, NFT_REG_2 (16-byte registers, as nft uses).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;

/// Key types nft gives sets (datatype numbers of nft's `datatype.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
    IfName,
    FibAddrType,
}

impl KeyType {
    pub fn number(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 7,
            KeyType::Ipv6Addr => 8,
            KeyType::InetProto => 12,
            KeyType::InetService => 13,
            KeyType::IfName => 41,
            KeyType::FibAddrType => 38,
        }
    }
    pub fn key_len(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 4,
            KeyType::Ipv6Addr => 16,
            KeyType::InetProto => 1,
            KeyType::InetService => 2,
            KeyType::IfName => 16,
            KeyType::FibAddrType => 4,
        }
    }
    /// Whether the key is in network byte order (nft's set userdata
    /// records it: 2 big endian, 1 host).
    pub fn big_endian(self) -> bool {
        matches!(
            self,
            KeyType::Ipv4Addr | KeyType::Ipv6Addr | KeyType::InetService
        )
    }
}

/// An anonymous constant set a rule's `{ … }` becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonSet {
    pub key: KeyType,
    pub interval: bool,
    /// Elements as (start, end inclusive) key bytes; equal for a single
    /// value.
    pub elems: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
    Lte,
    Gte,
}

impl CmpOp {
    pub fn number(self) -> u32 {
        match self {
            CmpOp::Eq => 0,
            CmpOp::Neq => 1,
            CmpOp::Lte => 3,
            CmpOp::Gte => 5,
        }
    }
}

/// Which set a lookup names: one of the table's (by name) or the
/// anonymous set made for this rule (by its index in the rule's list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetRef {
    Named(String),
    Anon(usize),
}

/// One kernel expression (`NFTA_EXPR_NAME` and its data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    MetaLoad {
        key: u32,
        dreg: u32,
    },
    MetaSet {
        key: u32,
        sreg: u32,
    },
    Cmp {
        sreg: u32,
        op: CmpOp,
        data: Vec<u8>,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Bitwise {
        reg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict(Verdict),
    Lookup {
        set: SetRef,
        sreg: u32,
        invert: bool,
    },
    Socket {
        key: u32,
        dreg: u32,
    },
    Fib {
        result: u32,
        flags: u32,
        dreg: u32,
    },
    Ct {
        key: u32,
        dreg: u32,
    },
    Counter,
    Tproxy {
        family: u32,
        reg_addr: Option<u32>,
        reg_port: u32,
    },
    Redir {
        reg_proto_min: u32,
    },
}

impl Expr {
    /// The kernel's name for the expression (`NFTA_EXPR_NAME`).
    pub fn name(&self) -> &'static str {
        match self {
            Expr::MetaLoad { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Lookup { .. } => "lookup",
            Expr::Socket { .. } => "socket",
            Expr::Fib { .. } => "fib",
            Expr::Ct { .. } => "ct",
            Expr::Counter => "counter",
            Expr::Tproxy { .. } => "tproxy",
            Expr::Redir { .. } => "redir",
        }
    }
}

pub const META_MARK: u32 = 3;
pub const META_IIFNAME: u32 = 6;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;

/// A rule lowered: its expressions and the anonymous sets they look up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lowered {
    pub exprs: Vec<Expr>,
    pub anon_sets: Vec<AnonSet>,
}

/// What the rule has established so far, so nft's implicit dependencies
/// are added only where nft adds them.
#[derive(Default)]
struct Context {
    nfproto: Option<Family>,
    l4proto: Option<Proto>,
}

fn ifname_bytes(name: &str) -> Vec<u8> {
    // IFNAMSIZ with the terminating NUL; longer names were refused by the
    // config, and a cut one could only fail to match.
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

impl Lowered {
    fn push(&mut self, e: Expr) {
        self.exprs.push(e);
    }

    /// `{ … }` of single values: a comparison for one, else an anonymous
    /// set looked up.
    fn match_values(&mut self, key: KeyType, values: Vec<Vec<u8>>, negate: bool) {
        if let [one] = values.as_slice() {
            let op = if negate { CmpOp::Neq } else { CmpOp::Eq };
            self.push(Expr::Cmp {
                sreg: REG_1,
                op,
                data: one.clone(),
            });
            return;
        }
        let index = self.anon_sets.len();
        self.anon_sets.push(AnonSet {
            key,
            interval: false,
            elems: values.into_iter().map(|v| (v.clone(), v)).collect(),
        });
        self.push(Expr::Lookup {
            set: SetRef::Anon(index),
            sreg: REG_1,
            invert: negate,
        });
    }
}

impl Context {
    fn need_nfproto(&mut self, out: &mut Lowered, family: Family) {
        if self.nfproto != Some(family) {
            out.push(Expr::MetaLoad {
                key: META_NFPROTO,
                dreg: REG_1,
            });
            out.push(Expr::Cmp {
                sreg: REG_1,
                op: CmpOp::Eq,
                data: vec![family.nfproto()],
            });
            self.nfproto = Some(family);
        }
    }

    fn need_l4proto(&mut self, out: &mut Lowered, proto: Proto) {
        if self.l4proto != Some(proto) {
            out.push(Expr::MetaLoad {
                key: META_L4PROTO,
                dreg: REG_1,
            });
            out.push(Expr::Cmp {
                sreg: REG_1,
                op: CmpOp::Eq,
                data: vec![proto.number()],
            });
            self.l4proto = Some(proto);
        }
    }
}

impl Rule {
    /// The rule's expressions, as nft makes them of its text.
    pub fn lower(&self) -> Lowered {
        let mut out = Lowered::default();
        let mut cx = Context::default();
        for item in &self.0 {
            item.lower(&mut cx, &mut out);
        }
        out
    }
}

impl Item {
    fn lower(&self, cx: &mut Context, out: &mut Lowered) {
        match self {
            Item::MetaMark(mark) => {
                out.push(Expr::MetaLoad {
                    key: META_MARK,
                    dreg: REG_1,
                });
                out.push(Expr::Cmp {
                    sreg: REG_1,
                    op: CmpOp::Eq,
                    data: mark.to_ne_bytes().to_vec(),
                });
            }
            Item::IifnameNotIn { names, .. } => {
                out.push(Expr::MetaLoad {
                    key: META_IIFNAME,
                    dreg: REG_1,
                });
                if !names.iter().any(|n| n.ends_with('*')) {
                    let values = names.iter().map(|n| ifname_bytes(n)).collect();
                    out.match_values(KeyType::IfName, values, true);
                } else if let [one] = names.as_slice() {
                    // `eth*`: compare only the prefix's bytes.
                    out.push(Expr::Cmp {
                        sreg: REG_1,
                        op: CmpOp::Neq,
                        data: one.trim_end_matches('*').as_bytes().to_vec(),
                    });
                } else {
                    // With a wildcard among them, nft makes the set an
                    // interval set: a name is the range of itself, `eth*`
                    // the range of every name starting with `eth`.
                    let elems = names
                        .iter()
                        .map(|n| match n.strip_suffix('*') {
                            Some(prefix) => {
                                let low = ifname_bytes(prefix);
                                let mut high = low.clone();
                                for b in high.iter_mut().skip(prefix.len()) {
                                    *b = 0xff;
                                }
                                (low, high)
                            }
                            None => (ifname_bytes(n), ifname_bytes(n)),
                        })
                        .collect();
                    let index = out.anon_sets.len();
                    out.anon_sets.push(AnonSet {
                        key: KeyType::IfName,
                        interval: true,
                        elems,
                    });
                    out.push(Expr::Lookup {
                        set: SetRef::Anon(index),
                        sreg: REG_1,
                        invert: true,
                    });
                }
            }
            Item::NfProto(family) => {
                out.push(Expr::MetaLoad {
                    key: META_NFPROTO,
                    dreg: REG_1,
                });
                out.push(Expr::Cmp {
                    sreg: REG_1,
                    op: CmpOp::Eq,
                    data: vec![family.nfproto()],
                });
                cx.nfproto = Some(*family);
            }
            Item::L4Proto(protos) => {
                out.push(Expr::MetaLoad {
                    key: META_L4PROTO,
                    dreg: REG_1,
                });
                let values = protos.iter().map(|p| vec![p.number()]).collect();
                out.match_values(KeyType::InetProto, values, false);
                if let [one] = protos.as_slice() {
                    cx.l4proto = Some(*one);
                }
            }
            Item::Dport { proto, ports, .. } => {
                if let Some(p) = proto {
                    cx.need_l4proto(out, *p);
                }
                out.push(Expr::Payload {
                    base: 2,
                    offset: 2,
                    len: 2,
                    dreg: REG_1,
                });
                match ports.as_slice() {
                    [(a, b)] if a != b => {
                        out.push(Expr::Cmp {
                            sreg: REG_1,
                            op: CmpOp::Gte,
                            data: a.to_be_bytes().to_vec(),
                        });
                        out.push(Expr::Cmp {
                            sreg: REG_1,
                            op: CmpOp::Lte,
                            data: b.to_be_bytes().to_vec(),
                        });
                    }
                    list if list.iter().any(|(a, b)| a != b) => {
                        let index = out.anon_sets.len();
                        out.anon_sets.push(AnonSet {
                            key: KeyType::InetService,
                            interval: true,
                            elems: list
                                .iter()
                                .map(|(a, b)| (a.to_be_bytes().to_vec(), b.to_be_bytes().to_vec()))
                                .collect(),
                        });
                        out.push(Expr::Lookup {
                            set: SetRef::Anon(index),
                            sreg: REG_1,
                            invert: false,
                        });
                    }
                    list => {
                        let values = list.iter().map(|(a, _)| a.to_be_bytes().to_vec()).collect();
                        out.match_values(KeyType::InetService, values, false);
                    }
                }
            }
            Item::TcpFlagsNotSyn => {
                cx.need_l4proto(out, Proto::Tcp);
                out.push(Expr::Payload {
                    base: 2,
                    offset: 13,
                    len: 1,
                    dreg: REG_1,
                });
                // syn 0x02, ack 0x10
                out.push(Expr::Bitwise {
                    reg: REG_1,
                    len: 1,
                    mask: vec![0x12],
                    xor: vec![0],
                });
                out.push(Expr::Cmp {
                    sreg: REG_1,
                    op: CmpOp::Neq,
                    data: vec![0x02],
                });
            }
            Item::SocketTransparent => {
                out.push(Expr::Socket {
                    key: 0,
                    dreg: REG_1,
                });
                out.push(Expr::Cmp {
                    sreg: REG_1,
                    op: CmpOp::Eq,
                    data: vec![1],
                });
            }
            Item::FibDaddrType(types) => {
                // NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR
                out.push(Expr::Fib {
                    result: 3,
                    flags: 2,
                    dreg: REG_1,
                });
                let values = types
                    .iter()
                    .map(|t| t.rtn().to_ne_bytes().to_vec())
                    .collect();
                out.match_values(KeyType::FibAddrType, values, false);
            }
            Item::CtStatusDnat => {
                // NFT_CT_STATUS; IPS_DST_NAT = 1 << 5, host byte order.
                out.push(Expr::Ct {
                    key: 2,
                    dreg: REG_1,
                });
                out.push(Expr::Bitwise {
                    reg: REG_1,
                    len: 4,
                    mask: 0x20u32.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    sreg: REG_1,
                    op: CmpOp::Neq,
                    data: vec![0; 4],
                });
            }
            Item::InSet {
                family,
                source,
                negate,
                set,
            } => {
                cx.need_nfproto(out, *family);
                let (offset, len) = match (family, source) {
                    (Family::V4, true) => (12, 4),
                    (Family::V4, false) => (16, 4),
                    (Family::V6, true) => (8, 16),
                    (Family::V6, false) => (24, 16),
                };
                out.push(Expr::Payload {
                    base: 1,
                    offset,
                    len,
                    dreg: REG_1,
                });
                out.push(Expr::Lookup {
                    set: SetRef::Named(set.clone()),
                    sreg: REG_1,
                    invert: *negate,
                });
            }
            Item::Counter => out.push(Expr::Counter),
            Item::MarkSet(mark) => {
                out.push(Expr::Immediate {
                    dreg: REG_1,
                    data: mark.to_ne_bytes().to_vec(),
                });
                out.push(Expr::MetaSet {
                    key: META_MARK,
                    sreg: REG_1,
                });
            }
            Item::Tproxy(serves, port) => {
                let port = port.to_be_bytes().to_vec();
                let (family, addr) = match serves {
                    Serves::Both => (0, None),
                    Serves::V4(None) => (2, None),
                    Serves::V4(Some(ip)) | Serves::V6(ip) => {
                        let bytes = match ip {
                            IpAddr::V4(v4) => v4.octets().to_vec(),
                            IpAddr::V6(v6) => v6.octets().to_vec(),
                        };
                        (if ip.is_ipv4() { 2 } else { 10 }, Some(bytes))
                    }
                };
                match addr {
                    Some(addr) => {
                        out.push(Expr::Immediate {
                            dreg: REG_1,
                            data: addr,
                        });
                        out.push(Expr::Immediate {
                            dreg: REG_2,
                            data: port,
                        });
                        out.push(Expr::Tproxy {
                            family,
                            reg_addr: Some(REG_1),
                            reg_port: REG_2,
                        });
                    }
                    None => {
                        out.push(Expr::Immediate {
                            dreg: REG_1,
                            data: port,
                        });
                        out.push(Expr::Tproxy {
                            family,
                            reg_addr: None,
                            reg_port: REG_1,
                        });
                    }
                }
            }
            Item::Redirect(port) => {
                out.push(Expr::Immediate {
                    dreg: REG_1,
                    data: port.to_be_bytes().to_vec(),
                });
                out.push(Expr::Redir {
                    reg_proto_min: REG_1,
                });
            }
            Item::Verdict(v) => out.push(Expr::Verdict(*v)),
        }
    }
}

/// The kernel elements of an interval set, as nft sends them: each range
/// as its start and, flagged INTERVAL_END, the address after its end; an
/// end-flagged zero first when the first range does not start at zero; no
/// end element for a range that reaches the top of the space.
/// Overlapping ranges are merged (the kernel refuses overlaps), touching
/// ones kept apart as nft keeps them.
pub fn interval_elements(mut ranges: Vec<(u128, u128)>, width: usize) -> Vec<(Vec<u8>, bool)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    let top = if width >= 16 {
        u128::MAX
    } else {
        (1u128 << (8 * width)) - 1
    };
    let bytes = |v: u128| v.to_be_bytes()[16 - width.min(16)..].to_vec();
    let mut out = Vec::with_capacity(merged.len() * 2 + 1);
    if merged.first().is_some_and(|(lo, _)| *lo != 0) {
        out.push((bytes(0), true));
    }
    for (lo, hi) in merged {
        out.push((bytes(lo), false));
        if hi < top {
            out.push((bytes(hi + 1), true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_encoded_as_nft_does() {
        // 10.0.0.0/8 and 224.0.0.0/3 (to the top): zero first, no last end.
        let e = interval_elements(
            vec![(0x0a00_0000, 0x0aff_ffff), (0xe000_0000, 0xffff_ffff)],
            4,
        );
        assert_eq!(
            e,
            vec![
                (vec![0, 0, 0, 0], true),
                (vec![10, 0, 0, 0], false),
                (vec![11, 0, 0, 0], true),
                (vec![224, 0, 0, 0], false),
            ]
        );
        // Overlaps merge, touching ranges stay two.
        let e = interval_elements(vec![(0, 9), (5, 20), (21, 30)], 2);
        assert_eq!(
            e,
            vec![
                (vec![0, 0], false),
                (vec![0, 21], true),
                (vec![0, 21], false),
                (vec![0, 31], true),
            ]
        );
    }

    #[test]
    fn one_element_braces_become_a_comparison_and_a_range_two() {
        let rule = Rule(vec![
            Item::L4Proto(vec![Proto::Tcp]),
            Item::Dport {
                proto: Some(Proto::Tcp),
                ports: vec![(53, 53)],
                braces: true,
            },
            Item::Verdict(Verdict::Drop),
        ]);
        assert_eq!(rule.to_string(), "meta l4proto tcp tcp dport { 53 } drop");
        let low = rule.lower();
        assert!(low.anon_sets.is_empty());
        assert_eq!(
            low.exprs.iter().map(Expr::name).collect::<Vec<_>>(),
            ["meta", "cmp", "payload", "cmp", "immediate"]
        );
        let rule = Rule(vec![Item::Dport {
            proto: Some(Proto::Udp),
            ports: vec![(6000, 7000)],
            braces: true,
        }]);
        // nft adds `meta l4proto udp` itself.
        assert_eq!(
            rule.lower()
                .exprs
                .iter()
                .map(Expr::name)
                .collect::<Vec<_>>(),
            ["meta", "cmp", "payload", "cmp", "cmp"]
        );
        let rule = Rule(vec![Item::Dport {
            proto: None,
            ports: vec![(53, 53), (6000, 7000)],
            braces: true,
        }]);
        let low = rule.lower();
        assert_eq!(low.anon_sets.len(), 1);
        assert!(low.anon_sets[0].interval);
    }

    #[test]
    fn ip_daddr_gets_its_family_dependency_once() {
        let rule = Rule(vec![
            Item::NfProto(Family::V6),
            Item::InSet {
                family: Family::V6,
                source: false,
                negate: false,
                set: "bypass_v6".into(),
            },
        ]);
        assert_eq!(rule.lower().exprs.len(), 4);
        assert_eq!(rule.to_string(), "meta nfproto ipv6 ip6 daddr @bypass_v6");
    }
}
