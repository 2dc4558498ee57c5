//! A minimal nf_tables client over netlink, in pure Rust: just enough to
//! replace one table of the agent's own (a few base chains of simple
//! match-and-verdict rules) in one atomic transaction, and to delete it.
//!
//! Why not the `nft` program: the agent image is `FROM scratch` and holds no
//! `nft`; why not a crate: the maintained pure-Rust one (`rustables`) is
//! GPL-3.0, and the others bind libnftnl (a C library the image lacks). The
//! wire format is the kernel's (`include/uapi/linux/netfilter/nf_tables.h`,
//! `nfnetlink.h`); `nft list table inet NAME` shows what was installed.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

// netlink (linux/netlink.h)
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

// nfnetlink (linux/netfilter/nfnetlink.h)
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

// nf_tables messages
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

/// `NFPROTO_INET`: a table seeing both IPv4 and IPv6.
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;

// attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Netfilter hooks a base chain can sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets for the host itself.
    Input = 1,
    /// Packets routed (or, with `br_netfilter`, bridged) through the host.
    Forward = 2,
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The packet is IPv4.
    Ipv4,
    /// IPv4 source address within `net/prefix`.
    Saddr(Ipv4Addr, u8),
    /// IPv4 destination address within `net/prefix`.
    Daddr(Ipv4Addr, u8),
    /// The destination's bits outside `prefix` equal those of `host`
    /// (e.g. the last address of every /28).
    DaddrHostPart(u8, u32),
    /// Layer 4 protocol (6 TCP, 17 UDP).
    L4Proto(u8),
    /// TCP or UDP destination port (with an [`Match::L4Proto`] before it).
    Dport(u16),
    /// Conntrack says established or related.
    EstablishedOrRelated,
    /// The input interface's name starts with this (`iifname "p*"`).
    IifnamePrefix(&'static str),
    /// The output interface's name starts with this (`oifname "p*"`).
    OifnamePrefix(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
}

/// A base chain (type filter, policy accept) and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// A netlink message under construction (header filled in at the end).
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        // struct nfgenmsg
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d)
    }

    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("balanced nests");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty());
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    /// One expression: `name` with attributes written by `data`.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Msg)) -> &mut Self {
        self.begin(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name);
        self.begin(NFTA_EXPR_DATA);
        data(self);
        self.end().end()
    }

    fn cmp(&mut self, op: u32, value: &[u8]) -> &mut Self {
        self.expr("cmp", |m| {
            m.be32(1, NFT_REG_1) // NFTA_CMP_SREG
                .be32(2, op) // NFTA_CMP_OP
                .begin(3) // NFTA_CMP_DATA
                .attr(NFTA_DATA_VALUE, value)
                .end();
        })
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) -> &mut Self {
        self.expr("payload", |m| {
            m.be32(1, NFT_REG_1) // NFTA_PAYLOAD_DREG
                .be32(2, base) // NFTA_PAYLOAD_BASE
                .be32(3, offset)
                .be32(4, len);
        })
    }

    fn meta(&mut self, key: u32) -> &mut Self {
        self.expr("meta", |m| {
            m.be32(1, NFT_REG_1).be32(2, key); // NFTA_META_DREG, NFTA_META_KEY
        })
    }

    /// `reg1 = (reg1 & mask) ^ 0`.
    fn mask(&mut self, mask: &[u8]) -> &mut Self {
        let zero = vec![0u8; mask.len()];
        self.expr("bitwise", |m| {
            m.be32(1, NFT_REG_1) // SREG
                .be32(2, NFT_REG_1) // DREG
                .be32(3, mask.len() as u32) // LEN
                .begin(4)
                .attr(NFTA_DATA_VALUE, mask)
                .end()
                .begin(5)
                .attr(NFTA_DATA_VALUE, &zero)
                .end();
        })
    }

    fn masked_addr(&mut self, offset: u32, net: Ipv4Addr, prefix: u8) -> &mut Self {
        const NETWORK_HEADER: u32 = 1;
        let mask = prefix_mask(prefix);
        self.payload(NETWORK_HEADER, offset, 4);
        if prefix < 32 {
            self.mask(&mask.to_be_bytes());
        }
        self.cmp(0, &(u32::from(net) & mask).to_be_bytes())
    }

    fn matches(&mut self, m: &Match) -> &mut Self {
        const NFT_META_NFPROTO: u32 = 15;
        const NFT_META_L4PROTO: u32 = 16;
        const NFT_META_IIFNAME: u32 = 6;
        const NFT_META_OIFNAME: u32 = 7;
        const TRANSPORT_HEADER: u32 = 2;
        const NFT_CMP_EQ: u32 = 0;
        const NFT_CMP_NEQ: u32 = 1;
        match *m {
            Match::Ipv4 => self.meta(NFT_META_NFPROTO).cmp(NFT_CMP_EQ, &[NFPROTO_IPV4]),
            Match::Saddr(net, p) => self.masked_addr(12, net, p),
            Match::Daddr(net, p) => self.masked_addr(16, net, p),
            Match::DaddrHostPart(prefix, host) => {
                let hostmask = !prefix_mask(prefix);
                self.payload(1, 16, 4)
                    .mask(&hostmask.to_be_bytes())
                    .cmp(NFT_CMP_EQ, &(host & hostmask).to_be_bytes())
            }
            Match::L4Proto(p) => self.meta(NFT_META_L4PROTO).cmp(NFT_CMP_EQ, &[p]),
            Match::Dport(port) => self
                .payload(TRANSPORT_HEADER, 2, 2)
                .cmp(NFT_CMP_EQ, &port.to_be_bytes()),
            // `cmp` compares as many bytes as the value holds: a prefix.
            Match::IifnamePrefix(p) => self.meta(NFT_META_IIFNAME).cmp(NFT_CMP_EQ, p.as_bytes()),
            Match::OifnamePrefix(p) => self.meta(NFT_META_OIFNAME).cmp(NFT_CMP_EQ, p.as_bytes()),
            Match::EstablishedOrRelated => {
                // ct state is a host-order bitmask: 1 << ctinfo
                // (ESTABLISHED = 0, RELATED = 1).
                const NFT_CT_STATE: u32 = 0;
                self.expr("ct", |m| {
                    m.be32(1, NFT_REG_1).be32(2, NFT_CT_STATE); // DREG, KEY
                })
                .mask(&0b110u32.to_ne_bytes())
                .cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes())
            }
        }
    }

    fn verdict(&mut self, v: Verdict) -> &mut Self {
        let code = match v {
            Verdict::Accept => NF_ACCEPT,
            Verdict::Drop => NF_DROP,
        };
        self.expr("immediate", |m| {
            m.be32(1, NFT_REG_VERDICT) // NFTA_IMMEDIATE_DREG
                .begin(2) // NFTA_IMMEDIATE_DATA
                .begin(NFTA_DATA_VERDICT)
                .be32(NFTA_VERDICT_CODE, code)
                .end()
                .end();
        })
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// The messages of one transaction, wrapped in a batch.
struct Batch {
    msgs: Vec<Vec<u8>>,
    seq: u32,
    /// Messages that ask for an acknowledgement.
    acked: u32,
}

impl Batch {
    fn new() -> Batch {
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let mut b = Batch {
            msgs: Vec::new(),
            seq,
            acked: 0,
        };
        let begin = Msg::new(NFNL_MSG_BATCH_BEGIN, 0, b.next(), 0, NFNL_SUBSYS_NFTABLES);
        b.msgs.push(begin.finish());
        b
    }

    fn next(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn msg(&mut self, kind: u16, flags: u16) -> Msg {
        self.acked += 1;
        let seq = self.next();
        Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
        )
    }

    fn push(&mut self, m: Msg) {
        self.msgs.push(m.finish());
    }

    fn finish(mut self) -> (Vec<u8>, u32) {
        let end = Msg::new(NFNL_MSG_BATCH_END, 0, self.next(), 0, NFNL_SUBSYS_NFTABLES);
        self.msgs.push(end.finish());
        (self.msgs.concat(), self.acked)
    }
}

/// The transaction that replaces table `inet NAME` by `chains` (creating
/// it first so that the delete never fails: one atomic swap).
fn replace_batch(table: &str, chains: &[Chain]) -> (Vec<u8>, u32) {
    let mut b = Batch::new();
    let mut m = b.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    m.str(NFTA_TABLE_NAME, table);
    b.push(m);
    let mut m = b.msg(NFT_MSG_DELTABLE, 0);
    m.str(NFTA_TABLE_NAME, table);
    b.push(m);
    let mut m = b.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    m.str(NFTA_TABLE_NAME, table);
    b.push(m);
    for c in chains {
        let mut m = b.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        m.str(NFTA_CHAIN_TABLE, table)
            .str(NFTA_CHAIN_NAME, &c.name)
            .begin(NFTA_CHAIN_HOOK)
            .be32(NFTA_HOOK_HOOKNUM, c.hook as u32)
            .be32(NFTA_HOOK_PRIORITY, c.priority as u32)
            .end()
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, "filter");
        b.push(m);
        for r in &c.rules {
            let mut m = b.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
            m.str(NFTA_RULE_TABLE, table)
                .str(NFTA_RULE_CHAIN, &c.name)
                .begin(NFTA_RULE_EXPRESSIONS);
            for x in &r.matches {
                m.matches(x);
            }
            m.verdict(r.verdict).end();
            b.push(m);
        }
    }
    b.finish()
}

fn delete_batch(table: &str) -> (Vec<u8>, u32) {
    let mut b = Batch::new();
    let mut m = b.msg(NFT_MSG_DELTABLE, 0);
    m.str(NFTA_TABLE_NAME, table);
    b.push(m);
    b.finish()
}

/// Sends one batch and waits for every acknowledgement; the first error
/// the kernel reports (the whole batch is then undone) is returned.
fn transact((batch, acks): (Vec<u8>, u32)) -> io::Result<()> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netlink};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    let kernel = netlink::SocketAddrNetlink::new(0, 0);
    rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(5)),
    )?;
    rustix::net::sendto(&fd, &batch, SendFlags::empty(), &kernel)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < acks {
        let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < 16 || at + len > n {
                break;
            }
            if kind == NLMSG_ERROR && len >= 20 {
                let errno = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                got += 1;
            }
            at += (len + 3) & !3;
        }
    }
    Ok(())
}

/// Installs table `inet NAME` holding `chains`, replacing any table of that
/// name in one transaction.
pub fn replace_table(name: &str, chains: &[Chain]) -> io::Result<()> {
    transact(replace_batch(name, chains))
}

/// Deletes table `inet NAME`; one that does not exist is not an error.
pub fn delete_table(name: &str) -> io::Result<()> {
    match transact(delete_batch(name)) {
        Err(e) if e.raw_os_error() == Some(2) => Ok(()), // ENOENT
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_aligned_and_nested_lengths_add_up() {
        let chains = vec![Chain {
            name: "forward".into(),
            hook: Hook::Forward,
            priority: -1,
            rules: vec![Rule {
                matches: vec![
                    Match::Ipv4,
                    Match::Saddr("10.213.0.0".parse().unwrap(), 16),
                    Match::EstablishedOrRelated,
                    Match::L4Proto(17),
                    Match::Dport(53),
                ],
                verdict: Verdict::Drop,
            }],
        }];
        let (buf, acks) = replace_batch("t", &chains);
        assert_eq!(acks, 5, "3 table messages, a chain, a rule");
        // Walk the messages: each length is a multiple of 4 and they tile the buffer.
        let mut at = 0;
        let mut n = 0;
        while at < buf.len() {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            assert!(len >= 20 && len % 4 == 0, "{len}");
            at += len;
            n += 1;
        }
        assert_eq!(at, buf.len());
        assert_eq!(n, 7, "begin, 5 messages, end");
        assert_eq!(prefix_mask(28), 0xffff_fff0);
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
