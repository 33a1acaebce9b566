//! Label and field selectors, as the API server parses them from `labelSelector` and
//! `fieldSelector` query parameters.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn set_values(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set of values, found {rest:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
        return Err(format!("invalid label value: {bad:?}"));
    }
    Ok(values)
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_values(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_values(rest)?)
            } else {
                LabelReq::Exists(part.to_string())
            };
            let (key, value) = match &req {
                LabelReq::Eq(k, v) | LabelReq::NotEq(k, v) => (k, Some(v)),
                LabelReq::In(k, _)
                | LabelReq::NotIn(k, _)
                | LabelReq::Exists(k)
                | LabelReq::NotExists(k) => (k, None),
            };
            if !valid_key(key) {
                return Err(format!(
                    "unable to parse requirement: invalid label key {key:?}"
                ));
            }
            if let Some(v) = value
                && !valid_value(v)
            {
                return Err(format!(
                    "unable to parse requirement: invalid label value {v:?}"
                ));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The selector in the form [`LabelSelector::parse`] reads: requirements joined by `,`,
/// each as Kubernetes prints it (`a=b`, `a!=b`, `a in (b,c)`, `a notin (b)`, `a`, `!a`).
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, req) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match req {
                LabelReq::Eq(k, v) => write!(f, "{k}={v}")?,
                LabelReq::NotEq(k, v) => write!(f, "{k}!={v}")?,
                LabelReq::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                LabelReq::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                LabelReq::Exists(k) => f.write_str(k)?,
                LabelReq::NotExists(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// A parsed field selector: `path=value` / `path!=value` terms on dotted paths of the
/// object as the client sees it (`metadata.name`, `involvedObject.uid`, `status.phase`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `a.b=c,d!=e`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (path, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand it"));
            };
            let path = path.trim();
            if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(format!("invalid field path {path:?}"));
            }
            terms.push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Whether `obj` is selected. A missing field reads as the empty string.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let actual = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *eq
        })
    }
}

/// The selector in the form [`FieldSelector::parse`] reads: terms joined by `,`, each
/// `path==value` or `path!=value` (`==` rather than `=`, so that a value that begins with
/// `=` reads back as it is).
impl std::fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (path, eq, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if *eq { "==" } else { "!=" };
            write!(f, "{path}{op}{value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn selectors_print_as_they_parse() {
        for s in [
            "app=w,tier!=a",
            "tier in (a,b)",
            "tier notin (),!missing,app",
        ] {
            let parsed = LabelSelector::parse(s).unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert_eq!(
            LabelSelector::parse(" app == w ").unwrap().to_string(),
            "app=w"
        );
        let fields = FieldSelector::parse("a===b, c != d,e=").unwrap();
        assert_eq!(fields.to_string(), "a===b,c!=d,e==");
        assert_eq!(FieldSelector::parse(&fields.to_string()).unwrap(), fields);
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(json!({"app": "w", "tier": "a"}));
        let yes = [
            "app=w",
            "app==w",
            "app!=x",
            "tier in (a,b)",
            "tier notin (b)",
            "app",
            "!missing",
            "app=w,tier=a",
            "",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(Some(&l)), "{s}");
        }
        let no = [
            "app=x",
            "app!=w",
            "tier in (b,c)",
            "tier notin (a)",
            "missing",
            "!app",
            "app=w,tier=b",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(Some(&l)), "{s}");
        }
        assert!(
            LabelSelector::parse("missing notin (a)")
                .unwrap()
                .matches(None)
        );
        assert!(LabelSelector::parse("a b c=d").is_err());
    }

    #[test]
    fn field_selector_paths() {
        let ev = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"}});
        assert!(
            FieldSelector::parse("involvedObject.kind=Pod,involvedObject.name=p")
                .unwrap()
                .matches(&ev)
        );
        assert!(
            !FieldSelector::parse("involvedObject.name!=p")
                .unwrap()
                .matches(&ev)
        );
        assert!(
            FieldSelector::parse("involvedObject.uid=")
                .unwrap()
                .matches(&ev)
        );
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
