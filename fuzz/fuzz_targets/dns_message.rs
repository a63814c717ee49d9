//! A DNS message as it arrives from a client or a resolver: the header,
//! the first question, the answer records, what tproxyd learns from it
//! and the replies it makes (empty answer, SERVFAIL). Besides never
//! panicking: a learned name is a valid host name; a local reply keeps
//! the query's id and question and carries no record; an id rewrite
//! changes the first two bytes only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::dns::message::{
    answers, empty_answer, id, learn, question, servfail, set_id, Header, Question,
};
use tproxyd::hostname::is_host_name;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(70_000)];
    let _ = answers(data);
    for l in learn(data) {
        assert!(is_host_name(&l.name), "learned {:?}", l.name);
    }
    for reply in [empty_answer(data), servfail(data)].into_iter().flatten() {
        let h = Header::parse(&reply).expect("a local reply has a header");
        assert!(h.is_response());
        assert_eq!((h.qdcount, h.ancount, h.nscount, h.arcount), (1, 0, 0, 0));
        assert_eq!(Some(h.id), id(data));
        // The same question (written out uncompressed: its end may move).
        let same = |q: Question| (q.name, q.qtype, q.qclass);
        assert_eq!(
            question(&reply).ok().map(same),
            question(data).ok().map(same)
        );
        assert!(learn(&reply).is_empty());
    }
    let mut copy = data.to_vec();
    if set_id(&mut copy, 0xa55a) {
        assert_eq!(id(&copy), Some(0xa55a));
        assert_eq!(copy[2..], data[2..]);
    }
});
