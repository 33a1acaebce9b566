//! The quarantine list as a worker reads it from its mounted ConfigMap: any text.
//!
//! - each entry has an id of one word;
//! - the list the operator writes from the entries reads back as the same entries
//!   (render then parse is the identity on parsed lists), and renders to the same text;
//! - an entry's evidence headers are `x-testrunner-` names, one per evidence pair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_operator::contract::{HEADER_PREFIX, parse_quarantine_list};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let list = parse_quarantine_list(&text);
    for entry in &list {
        assert!(!entry.id.is_empty());
        assert!(!entry.id.contains(char::is_whitespace), "{:?}", entry.id);
        let headers = entry.evidence_headers();
        assert_eq!(headers.len(), entry.evidence.len());
        assert!(headers.iter().all(|(k, _)| k.starts_with(HEADER_PREFIX)));
        let _ = entry.diverts(entry.listed_at);
        let _ = entry.diverts(None);
    }
    let rendered: String = list.iter().map(|e| e.render()).collect();
    let reread = parse_quarantine_list(&rendered);
    assert_eq!(reread, list, "{rendered:?}");
    let again: String = reread.iter().map(|e| e.render()).collect();
    assert_eq!(again, rendered);
});
