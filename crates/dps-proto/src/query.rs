//! The service API's query specification (spec §5.3).
//!
//! Azure does not publish its grammar; the SDK samples use `SELECT * FROM enrollments`,
//! `SELECT * FROM enrollmentGroups` and a simple `WHERE` on a scalar field. This parser accepts
//! `SELECT * FROM <source> [WHERE <field> = <value> [AND <field> = <value>]...]`, keywords and source names
//! case-insensitive, values quoted with `'`, `"` or backticks (or bare words). Anything else is refused
//! with [`ErrorCode::InvalidQuery`] rather than silently ignored.

use crate::error::{DpsError, ErrorCode};

/// What a query selects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySource {
    /// `enrollments`
    Enrollments,
    /// `enrollmentGroups`
    EnrollmentGroups,
    /// `registrations` / `deviceRegistrations`
    Registrations,
}

/// One `field = value` condition. Field names are matched case-insensitively against the item's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// JSON field name as written in the query (e.g. `iotHubHostName`, `provisioningStatus`).
    pub field: String,
    /// Expected value, compared case-insensitively with the field's string form.
    pub value: String,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The source.
    pub source: QuerySource,
    /// Conditions that must all hold.
    pub conditions: Vec<Condition>,
}

impl Query {
    /// Whether a JSON item satisfies every condition. Missing fields never match.
    pub fn matches(&self, item: &serde_json::Value) -> bool {
        self.conditions.iter().all(|c| {
            let Some(obj) = item.as_object() else { return false };
            let found = obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(&c.field)).map(|(_, v)| v);
            match found {
                Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case(&c.value),
                Some(serde_json::Value::Bool(b)) => {
                    c.value.eq_ignore_ascii_case(if *b { "true" } else { "false" })
                }
                Some(serde_json::Value::Number(n)) => n.to_string() == c.value,
                _ => false,
            }
        })
    }
}

fn bad(q: &str, why: &str) -> DpsError {
    let shown: String = q.chars().take(200).collect();
    DpsError::with_message(ErrorCode::InvalidQuery, format!("query '{shown}' is not supported: {why}"))
}

fn tokenize(q: &str) -> Result<Vec<String>, DpsError> {
    let mut out = Vec::new();
    let mut chars = q.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '\'' || c == '"' || c == '`' {
            chars.next();
            let mut s = String::from("\u{0}");
            let mut closed = false;
            for d in chars.by_ref() {
                if d == c {
                    closed = true;
                    break;
                }
                s.push(d);
            }
            if !closed {
                return Err(bad(q, "unterminated quoted value"));
            }
            out.push(s);
        } else if c == '=' || c == '*' {
            chars.next();
            out.push(c.to_string());
        } else {
            let mut s = String::new();
            while let Some(&d) = chars.peek() {
                if d.is_whitespace() || d == '=' || d == '\'' || d == '"' || d == '`' {
                    break;
                }
                s.push(d);
                chars.next();
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// Parses a query. An empty query means "everything" from `default_source`.
pub fn parse_query(q: &str, default_source: QuerySource) -> Result<Query, DpsError> {
    if q.len() > 4096 {
        return Err(bad(q, "longer than 4096 characters"));
    }
    let toks = tokenize(q)?;
    if toks.is_empty() {
        return Ok(Query { source: default_source, conditions: Vec::new() });
    }
    let kw = |i: usize, k: &str| toks.get(i).is_some_and(|t| t.eq_ignore_ascii_case(k));
    if !(kw(0, "select") && kw(1, "*") && kw(2, "from")) {
        return Err(bad(q, "expected SELECT * FROM <enrollments|enrollmentGroups|registrations>"));
    }
    let source = match toks.get(3).map(|s| s.to_ascii_lowercase()).as_deref() {
        Some("enrollments") => QuerySource::Enrollments,
        Some("enrollmentgroups") => QuerySource::EnrollmentGroups,
        Some("registrations") | Some("deviceregistrations") => QuerySource::Registrations,
        _ => return Err(bad(q, "unknown source; expected enrollments, enrollmentGroups or registrations")),
    };
    let mut conditions = Vec::new();
    let mut i = 4;
    if toks.len() > 4 {
        if !kw(4, "where") {
            return Err(bad(q, "only a WHERE clause may follow the source"));
        }
        i = 5;
        loop {
            let (Some(field), Some(eq), Some(value)) = (toks.get(i), toks.get(i + 1), toks.get(i + 2)) else {
                return Err(bad(q, "expected <field> = <value>"));
            };
            if eq != "=" || field.starts_with('\u{0}') || field == "*" || field == "=" {
                return Err(bad(q, "expected <field> = <value>"));
            }
            let value = value.strip_prefix('\u{0}').unwrap_or(value).to_owned();
            conditions.push(Condition { field: field.clone(), value });
            i += 3;
            if i >= toks.len() {
                break;
            }
            if !kw(i, "and") {
                return Err(bad(q, "conditions may only be joined with AND"));
            }
            i += 1;
        }
    }
    let _ = i;
    Ok(Query { source, conditions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sdk_queries() {
        let q = parse_query("SELECT * FROM enrollments", QuerySource::Enrollments).unwrap();
        assert_eq!(q, Query { source: QuerySource::Enrollments, conditions: vec![] });
        let q = parse_query("select * from enrollmentGroups", QuerySource::Enrollments).unwrap();
        assert_eq!(q.source, QuerySource::EnrollmentGroups);
        let q = parse_query(
            "select * from enrollments where iotHubHostName=`ContosoIoTHub.azure-devices.net`",
            QuerySource::Enrollments,
        )
        .unwrap();
        assert_eq!(
            q.conditions,
            vec![Condition {
                field: "iotHubHostName".into(),
                value: "ContosoIoTHub.azure-devices.net".into()
            }]
        );
        assert!(q.matches(&json!({"iotHubHostName": "contosoiothub.azure-devices.net"})));
        assert!(!q.matches(&json!({"iotHubHostName": "other"})));
        assert!(!q.matches(&json!({})));
    }

    #[test]
    fn and_conditions_and_bare_values() {
        let q = parse_query(
            "SELECT * FROM enrollments WHERE provisioningStatus = 'disabled' AND capabilities = x",
            QuerySource::Enrollments,
        )
        .unwrap();
        assert_eq!(q.conditions.len(), 2);
        let q = parse_query(
            "SELECT * FROM enrollments WHERE provisioningStatus = disabled",
            QuerySource::Enrollments,
        )
        .unwrap();
        assert!(q.matches(&json!({"provisioningStatus": "disabled"})));
    }

    #[test]
    fn empty_query_selects_default() {
        let q = parse_query("  ", QuerySource::EnrollmentGroups).unwrap();
        assert_eq!(q.source, QuerySource::EnrollmentGroups);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        for bad in [
            "SELECT deviceId FROM enrollments",
            "SELECT * FROM devices",
            "SELECT * FROM enrollments WHERE a > 1",
            "SELECT * FROM enrollments WHERE a = 'x' OR b = 'y'",
            "SELECT * FROM enrollments GROUP BY a",
            "SELECT * FROM enrollments WHERE a = 'unterminated",
            "DROP TABLE enrollments",
        ] {
            assert_eq!(
                parse_query(bad, QuerySource::Enrollments).unwrap_err().code,
                ErrorCode::InvalidQuery,
                "{bad}"
            );
        }
    }
}
