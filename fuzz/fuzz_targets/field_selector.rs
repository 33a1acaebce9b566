//! Field selectors from the `fieldSelector` query parameter: any string.
//!
//! - a selector that parses prints (`Display`) to a selector that parses to the same
//!   terms, and prints again to the same text;
//! - matching never panics, on objects whose fields the selector names or not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use testrunner_sim::select::FieldSelector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(selector) = FieldSelector::parse(text) else {
        return;
    };
    let printed = selector.to_string();
    let reread = FieldSelector::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} prints as {printed:?}, which does not parse: {e}"));
    assert_eq!(reread, selector, "{text:?} prints as {printed:?}");
    assert_eq!(reread.to_string(), printed);
    let obj = json!({"metadata": {"name": text, "namespace": "default"}, "status": {"phase": 1}, "spec": null});
    let _ = selector.matches(&obj);
    let _ = selector.matches(&json!(null));
    let _ = selector.matches(&json!([text]));
});
