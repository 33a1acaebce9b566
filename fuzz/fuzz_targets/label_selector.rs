//! Label selectors from the `labelSelector` query parameter: any string.
//!
//! - a selector that parses prints (`Display`) to a selector that parses to the same
//!   requirements, and prints again to the same text;
//! - an object without labels is selected exactly when one with no labels is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_sim::select::LabelSelector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(selector) = LabelSelector::parse(text) else {
        return;
    };
    let printed = selector.to_string();
    let reread = LabelSelector::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} prints as {printed:?}, which does not parse: {e}"));
    assert_eq!(reread, selector, "{text:?} prints as {printed:?}");
    assert_eq!(reread.to_string(), printed);
    let empty = serde_json::Map::new();
    assert_eq!(selector.matches(None), selector.matches(Some(&empty)));
});
