//! The resolver's DNS parsing on guest-controlled (queries) and
//! upstream-controlled (responses) bytes: never panics, stays bounded, and
//! whatever parses as a query can be answered and parsed back.
#![no_main]

use grove_netd::dns;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = dns::parse_query(data) {
        assert!(q.name.len() <= 253);
        assert!(q.question_end <= data.len());
        let answer = dns::build_answer(data, &q, dns::RCODE_NOERROR, &[("192.0.2.1".parse().unwrap(), 5)]);
        let r = dns::parse_response(&answer, &q).expect("our own answer parses");
        assert_eq!(r.addrs.len(), 1);
        // The same bytes taken as the response to it.
        let _ = dns::parse_response(data, &q);
    }
    let q = dns::parse_query(&dns::build_query(7, "a.example", dns::TYPE_A)).unwrap();
    if let Ok(r) = dns::parse_response(data, &q) {
        assert!(r.addrs.len() <= dns::MAX_RECORDS);
    }
});
