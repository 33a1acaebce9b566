//! Durations in a pool's spec: `500ms`, `2s`, `5m`, `1h30m`.

use std::borrow::Cow;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Regular expression every duration field must match: one or more
/// `<number><unit>` groups with units ms, s, m or h (for example `2s`, `5m`, `1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,6}(ms|s|m|h))+$";

/// Longest duration text the schema accepts.
const MAX_LENGTH: u32 = 32;

/// A duration as the spec writes it. It reads back exactly as written, and is parsed
/// once, when it is read: [`SpecDuration::duration`] gives the value, or why the text
/// is not a duration (the API server checks the syntax with [`DURATION_PATTERN`]; an
/// object that bypassed it still deserializes, and the operator reports the field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecDuration {
    text: String,
    parsed: Result<Duration, String>,
}

impl SpecDuration {
    /// Parses `text`.
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let parsed = humantime::parse_duration(&text).map_err(|e| e.to_string());
        Self { text, parsed }
    }

    /// The text, as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The duration, or why the text is not one.
    pub fn duration(&self) -> Result<Duration, &str> {
        self.parsed.as_ref().copied().map_err(String::as_str)
    }
}

impl From<&str> for SpecDuration {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl std::fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<&str> for SpecDuration {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl Serialize for SpecDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for SpecDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::new)
    }
}

impl JsonSchema for SpecDuration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "SpecDuration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": MAX_LENGTH,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_as_written_and_parses_once() {
        let d: SpecDuration = serde_json::from_str(r#""1m30s""#).unwrap();
        assert_eq!(d.duration(), Ok(Duration::from_secs(90)));
        assert_eq!(d, "1m30s");
        assert_eq!(serde_json::to_string(&d).unwrap(), r#""1m30s""#);
        let bad = SpecDuration::new("soon");
        assert!(bad.duration().is_err());
        assert_eq!(serde_json::to_string(&bad).unwrap(), r#""soon""#);
    }
}
