//! Broker URIs from the pool's connection Secret: any string.
//!
//! - an accepted URI shows (`Display`, `Debug`, `redacted`) as a URL with no user, no
//!   password, no query and no fragment, with the host, port and path of the URI;
//! - the AMQP client gets the same host;
//! - a refused URI's reason is one of the fixed messages, never a piece of the URI
//!   other than its scheme.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_operator::broker::BrokerUri;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    match BrokerUri::parse(raw) {
        Ok(uri) => {
            let url = url::Url::parse(raw.trim()).expect("an accepted URI is a URL");
            let shown = uri.redacted();
            assert_eq!(uri.to_string(), shown);
            assert_eq!(format!("{uri:?}"), format!("BrokerUri({shown})"));
            let again = url::Url::parse(shown).expect("the redacted URI is a URL");
            assert_eq!(again.username(), "", "{shown:?}");
            assert_eq!(again.password(), None, "{shown:?}");
            assert_eq!(again.query(), None, "{shown:?}");
            assert_eq!(again.fragment(), None, "{shown:?}");
            assert_eq!(again.scheme(), url.scheme());
            assert_eq!(again.host_str(), url.host_str(), "{shown:?}");
            assert_eq!(again.port(), url.port());
            assert_eq!(again.path(), url.path(), "{shown:?}");
            if let Some(password) = url.password().filter(|p| p.len() >= 4) {
                let without = shown.replacen(url.host_str().unwrap_or_default(), "", 1);
                let without = without.replacen(url.path(), "", 1);
                assert!(!without.contains(password), "{shown:?} shows the password");
            }
            let amqp = uri.amqp_uri();
            assert_eq!(
                amqp.authority.host,
                url.host_str()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
            );
            assert_eq!(uri.expose(), raw.trim());
        }
        Err(e) => {
            let why = e.to_string();
            let fixed = ["the URI has no host", "the URI is not a valid AMQP URI"];
            match url::Url::parse(raw.trim()) {
                Err(parse) => assert_eq!(why, format!("not a URL ({parse})")),
                Ok(url) if url.scheme() != "amqp" && url.scheme() != "amqps" => assert_eq!(
                    why,
                    format!("scheme {:?} is not amqp or amqps", url.scheme())
                ),
                Ok(_) => assert!(fixed.contains(&why.as_str()), "{why:?}"),
            }
        }
    }
});
