//! Fault injection as the server configures and exposes it: the `[[faults]]` rules of the configuration
//! file ([`FaultSpec`], validated into the host's [`FaultRule`]s with errors naming the rule), and the admin
//! API on the HTTPS listener that adds, lists and removes rules at run time:
//!
//! - `GET /admin/faults`: the rules in force, in order, each with `fired` (how many requests it affected);
//! - `POST /admin/faults` with a rule as JSON (the `[[faults]]` keys): adds it after the others, `201`
//!   with the rule (its `id` generated as `fault-N` when not given); `400000` naming what is wrong,
//!   `409000` when the ID is taken;
//! - `DELETE /admin/faults/{id}`: removes it (`204`; `404000` when there is none); a stuck `assigning` it
//!   caused ends.
//!
//! Every call needs a service SAS token of a shared access policy with the `ServiceConfig` right (the
//! generated owner policy has it), signed as for the service API.

use crate::state::{now, AppState};
use dps_core::{DpsError, ErrorCode, Reply, Rights};
use dps_host::fault::{FaultAction, FaultKind, FaultRule, FaultTarget, Glob};
use dps_host::FaultStatus;
use serde::{Deserialize, Serialize};

/// The admin API's path.
pub const FAULTS_PATH: &str = "/admin/faults";

/// A fault rule as written in `[[faults]]` or sent to `POST /admin/faults`.
///
/// ```toml
/// [[faults]]
/// id = "flaky"                     # optional; default fault-N
/// registration_id = "flaky-*"      # glob: * any run, ? one character, case-insensitive
/// kind = "throttle"                # throttle | error | latency | stuck_assigning | drop_connection
/// requests = "any"                 # any | register | poll (stuck_assigning starts at the register)
/// probability = 0.5                # default 1.0
/// times = 3                        # fire at most this often (default: no limit)
/// retry_after_secs = 5             # throttle: the Retry-After, 1..=300
/// code = 503000                    # error: a 5xx code of the error table
/// latency_ms = 2000                # latency: added before the request runs, at most 60000
/// duration_secs = 30               # stuck_assigning: how long polls answer assigning (absent: forever)
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// The rule's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The registration-ID pattern.
    pub registration_id: String,
    /// What it does.
    pub kind: String,
    /// Which requests: `any` (default), `register`, `poll`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
    /// The chance it fires (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// The most times it fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// `throttle`: the Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
    /// `error`: the error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// `latency`: the added delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u32>,
    /// `stuck_assigning`: how long (absent: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u32>,
}

impl FaultSpec {
    /// The host rule, with `default_id` when the spec names none; the error says what is wrong (the
    /// caller adds which rule).
    pub fn to_rule(&self, default_id: &str) -> Result<FaultRule, String> {
        let kind = FaultKind::parse(&self.kind).ok_or_else(|| {
            let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("kind '{}' is not one of {}", self.kind, kinds.join(", "))
        })?;
        let only = |set: bool, key: &str, for_kind: FaultKind| -> Result<(), String> {
            if set && kind != for_kind {
                return Err(format!(
                    "{key} applies to kind \"{}\" only, not \"{}\"",
                    for_kind.as_str(),
                    kind.as_str()
                ));
            }
            Ok(())
        };
        only(self.retry_after_secs.is_some(), "retry_after_secs", FaultKind::Throttle)?;
        only(self.code.is_some(), "code", FaultKind::Error)?;
        only(self.latency_ms.is_some(), "latency_ms", FaultKind::Latency)?;
        only(self.duration_secs.is_some(), "duration_secs", FaultKind::StuckAssigning)?;
        let required =
            |v: Option<u32>, key: &str| v.ok_or_else(|| format!("kind \"{}\" needs {key}", kind.as_str()));
        let action = match kind {
            FaultKind::Throttle => FaultAction::Throttle {
                retry_after_secs: required(self.retry_after_secs, "retry_after_secs")?,
            },
            FaultKind::Error => FaultAction::error(required(self.code, "code")?).map_err(|e| e.message)?,
            FaultKind::Latency => FaultAction::Latency { millis: required(self.latency_ms, "latency_ms")? },
            FaultKind::StuckAssigning => FaultAction::StuckAssigning { secs: self.duration_secs },
            FaultKind::DropConnection => FaultAction::DropConnection,
        };
        let target = match self.requests.as_deref() {
            None => FaultTarget::Any,
            Some(r) => FaultTarget::parse(r)
                .ok_or_else(|| format!("requests '{r}' is not one of any, register, poll"))?,
        };
        let pattern =
            Glob::parse(&self.registration_id).map_err(|e| format!("registration_id: {}", e.message))?;
        let rule = FaultRule {
            id: self.id.clone().unwrap_or_else(|| default_id.to_owned()),
            pattern,
            target,
            action,
            probability: self.probability.unwrap_or(1.0),
            times: self.times,
        };
        rule.validate().map_err(|e| e.message)?;
        Ok(rule)
    }

    /// The spec of a host rule (what the admin API lists).
    pub fn from_rule(rule: &FaultRule) -> FaultSpec {
        let mut spec = FaultSpec {
            id: Some(rule.id.clone()),
            registration_id: rule.pattern.as_str().to_owned(),
            kind: rule.action.kind().as_str().to_owned(),
            requests: Some(rule.target.as_str().to_owned()),
            probability: Some(rule.probability),
            times: rule.times,
            ..FaultSpec::default()
        };
        match rule.action {
            FaultAction::Throttle { retry_after_secs } => spec.retry_after_secs = Some(retry_after_secs),
            FaultAction::Error { code } => spec.code = Some(code.code()),
            FaultAction::Latency { millis } => spec.latency_ms = Some(millis),
            FaultAction::StuckAssigning { secs } => spec.duration_secs = secs,
            FaultAction::DropConnection => {}
        }
        spec
    }
}

/// The rules of `[[faults]]`, validated: an error names the rule (`faults[2] ('flaky')`) and what is wrong.
pub fn rules_from_config(specs: &[FaultSpec]) -> Result<Vec<FaultRule>, String> {
    let mut rules: Vec<FaultRule> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let name = match &spec.id {
            Some(id) => format!("faults[{i}] ('{id}')"),
            None => format!("faults[{i}]"),
        };
        let rule = spec.to_rule(&format!("fault-{}", i + 1)).map_err(|e| format!("{name}: {e}"))?;
        if rules.iter().any(|r| r.id == rule.id) {
            return Err(format!("{name}: the id '{}' is used by an earlier rule", rule.id));
        }
        rules.push(rule);
    }
    Ok(rules)
}

fn listed(status: &FaultStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(FaultSpec::from_rule(&status.rule)).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("fired".into(), status.fired.into());
    }
    v
}

/// Answers a request to the admin API (`path` starts with [`FAULTS_PATH`]; the query is ignored).
pub fn handle(state: &AppState, method: &str, path: &str, authorization: Option<&str>, body: &[u8]) -> Reply {
    let tracking = dps_core::proto::id::format_uuid(state.random16());
    let error = |e: DpsError| Reply::error(&e, tracking.clone(), now());
    let principal = match dps_core::service::authenticate(&state.engine.config(), now(), authorization, path)
    {
        Ok(p) => p,
        Err(e) => return error(e),
    };
    if !principal.rights().contains(Rights::SERVICE_CONFIG) {
        return error(DpsError::with_message(
            ErrorCode::InsufficientRights,
            format!("the policy '{}' lacks the ServiceConfig right that fault rules need", principal.name()),
        ));
    }
    let rest = path.strip_prefix(FAULTS_PATH).unwrap_or_default();
    match (method, rest.trim_start_matches('/')) {
        ("GET", "") => {
            let list: Vec<serde_json::Value> = state.host.faults().iter().map(listed).collect();
            Reply::json(200, &list, tracking)
        }
        ("POST", "") => {
            let spec: FaultSpec = match dps_core::proto::strict::from_slice(body) {
                Ok(s) => s,
                Err(e) => {
                    return error(DpsError::with_message(
                        ErrorCode::InvalidJson,
                        format!("the body is not a fault rule: {e}"),
                    ))
                }
            };
            let taken: Vec<String> = state.host.faults().into_iter().map(|s| s.rule.id).collect();
            let default_id =
                (1..).map(|n| format!("fault-{n}")).find(|id| !taken.contains(id)).unwrap_or_default();
            let rule = match spec.to_rule(&default_id) {
                Ok(r) => r,
                Err(e) => {
                    let name = spec.id.as_deref().unwrap_or(&default_id);
                    return error(DpsError::with_message(
                        ErrorCode::BadRequest,
                        format!("fault rule '{name}': {e}"),
                    ));
                }
            };
            let id = rule.id.clone();
            match state.host.add_fault(rule) {
                Ok(()) => {
                    tracing::info!(rule = %id, "fault rule added");
                    let status = state.host.faults().into_iter().find(|s| s.rule.id == id);
                    Reply::json(201, &status.as_ref().map(listed), tracking)
                }
                Err(e) => error(e),
            }
        }
        ("DELETE", id) if !id.is_empty() => {
            let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
            if state.host.remove_fault(&id) {
                tracing::info!(rule = %id, "fault rule removed");
                Reply::empty(204, tracking)
            } else {
                error(DpsError::with_message(ErrorCode::NotFound, format!("there is no fault rule '{id}'")))
            }
        }
        (_, "") | ("DELETE", _) => error(DpsError::new(ErrorCode::MethodNotAllowed)),
        (_, _) => error(DpsError::with_message(ErrorCode::NotFound, format!("no admin route {path}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> FaultSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn every_kind_parses_and_lists_back() {
        let cases = [
            "registration_id = 'a*'\nkind = 'throttle'\nretry_after_secs = 5\nprobability = 0.5\ntimes = 2",
            "registration_id = 'a*'\nkind = 'error'\ncode = 503000\nrequests = 'poll'",
            "registration_id = 'a*'\nkind = 'latency'\nlatency_ms = 100",
            "registration_id = 'a*'\nkind = 'stuck_assigning'\nduration_secs = 30",
            "registration_id = 'a*'\nkind = 'stuck_assigning'",
            "id = 'x'\nregistration_id = '?'\nkind = 'drop_connection'\nrequests = 'register'",
        ];
        for text in cases {
            let s = spec(text);
            let rule = s.to_rule("fault-1").unwrap();
            let back = FaultSpec::from_rule(&rule);
            assert_eq!(back.to_rule("other").unwrap(), FaultRule { id: rule.id.clone(), ..rule }, "{text}");
        }
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_problem() {
        let cases = [
            ("registration_id = 'a'\nkind = 'explode'", "kind 'explode'"),
            ("registration_id = 'a'\nkind = 'throttle'", "needs retry_after_secs"),
            ("registration_id = 'a'\nkind = 'throttle'\nretry_after_secs = 500", "1..=300"),
            ("registration_id = 'a'\nkind = 'error'\ncode = 401000", "5xx"),
            (
                "registration_id = 'a'\nkind = 'error'\ncode = 503000\nlatency_ms = 3",
                "latency_ms applies to kind \"latency\"",
            ),
            ("registration_id = 'a'\nkind = 'drop_connection'\nprobability = 2.0", "probability"),
            ("registration_id = 'a'\nkind = 'drop_connection'\nrequests = 'connect'", "requests 'connect'"),
            ("registration_id = ''\nkind = 'drop_connection'", "registration_id"),
            ("id = 'no spaces'\nregistration_id = 'a'\nkind = 'drop_connection'", "id 'no spaces'"),
        ];
        for (text, needle) in cases {
            let e =
                rules_from_config(&[spec("registration_id = 'ok'\nkind = 'drop_connection'"), spec(text)])
                    .unwrap_err();
            assert!(e.starts_with("faults[1]"), "{e}");
            assert!(e.contains(needle), "{text}: {e}");
        }
        let one = spec("id = 'a'\nregistration_id = 'x'\nkind = 'drop_connection'");
        let twice = [one.clone(), one];
        let e = rules_from_config(&twice).unwrap_err();
        assert!(e.contains("faults[1] ('a')") && e.contains("earlier rule"), "{e}");
        assert!(toml::from_str::<FaultSpec>("registration_id = 'a'\nkind = 'error'\nbogus = 1").is_err());
    }
}
