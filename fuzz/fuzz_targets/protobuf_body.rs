//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`) of the embedded API
//! server: any bytes, as the body of a create or update of each kind it decodes, or of
//! a delete (`DeleteOptions`).
//!
//! - a body is decoded or refused with 400 (malformed) or 415 (a field or kind it does
//!   not decode), never a panic;
//! - a decoded object is a JSON object naming the apiVersion and kind of the URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_sim::kinds::{Kind, builtins};
use testrunner_sim::protobuf::{DECODED, decode_delete_options, decode_object};

fn kinds() -> &'static [Kind] {
    static KINDS: std::sync::OnceLock<Vec<Kind>> = std::sync::OnceLock::new();
    KINDS.get_or_init(|| {
        DECODED
            .iter()
            .map(|(api_version, kind)| {
                builtins()
                    .into_iter()
                    .find(|k| k.api_version() == *api_version && k.kind == *kind)
                    .expect("a decoded kind is built in")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kinds = kinds();
    let Some(kind) = kinds.get(usize::from(which) % (kinds.len() + 1)) else {
        match decode_delete_options(body) {
            Ok(options) => assert!(options.is_object(), "{options}"),
            Err(e) => assert_eq!(e.code, 400, "{}", e.status()),
        }
        return;
    };
    match decode_object(kind, body) {
        Ok(obj) => {
            assert_eq!(obj["apiVersion"], kind.api_version().as_str());
            assert_eq!(obj["kind"], kind.kind.as_str());
        }
        Err(e) => assert!(e.code == 400 || e.code == 415, "{}", e.status()),
    }
});
