//! The egress door's DNS stub: its answer to any message a sandbox sends.
//!
//! Beyond "no panic": an answer parses, carries the query's id and
//! questions, and is REFUSED with no records whenever a question names
//! something the allowlist does not allow; the only records it gives are A
//! records for allowed names pointing into the door's own 127.100.0.0/16;
//! and a message the stub drops is one that does not parse.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_policy::network::{parse_allow_entry, NetworkPolicy};
use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, RCODE};

const ALLOW: &[&str] = &["web.test", "*.wild.test", "api.example.com:8443"];

fuzz_target!(|data: &[u8]| {
    let answer = moat_egress::fuzzing::dns_answer(ALLOW, data);
    let Ok(query) = Packet::parse(data) else {
        assert!(answer.is_none(), "answered a message that does not parse");
        return;
    };
    let Some(answer) = answer else {
        return; // the reply could not be built (too large): nothing is sent
    };
    let policy = NetworkPolicy {
        allow: ALLOW
            .iter()
            .map(|a| parse_allow_entry(a).unwrap())
            .collect(),
        pins: Default::default(),
    };
    let reply = Packet::parse(&answer).expect("the stub's answer parses");
    assert_eq!(reply.id(), query.id());
    assert!(reply.has_flags(PacketFlag::RESPONSE));
    assert_eq!(reply.questions.len(), query.questions.len());
    let names: Vec<String> = query
        .questions
        .iter()
        .map(|q| q.qname.to_string())
        .collect();
    let all_allowed = names.iter().all(|n| policy.name_allowed(n));
    if !all_allowed {
        assert_eq!(reply.rcode(), RCODE::Refused);
        assert!(reply.answers.is_empty());
    }
    for rr in &reply.answers {
        let name = rr.name.to_string();
        assert!(policy.name_allowed(&name), "answered {name:?}");
        let RData::A(a) = &rr.rdata else {
            panic!("the stub gave a record that is not A: {rr:?}");
        };
        assert_eq!(a.address >> 16, (127 << 8) | 100, "{:x}", a.address);
    }
    assert!(reply.additional_records.is_empty() && reply.name_servers.is_empty());
});
