//! The pure codecs of `dps-proto` (and the continuation tokens of `dps-core`).

use crate::{assert_refusal, NOW};
use dps_core::store::{continuation_token, parse_continuation_token};
use dps_proto::certificate::{CertificateUpload, VerificationCertificate};
use dps_proto::model::{
    AttestationMechanism, BulkEnrollmentGroupOperation, BulkEnrollmentOperation, DeviceRegistration,
    DeviceRegistrationResult, DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment, InitialTwin,
    QuerySpecification, RegistrationOperationStatus, ReprovisionPolicy,
};
use dps_proto::mqtt::{
    build_username, operation_status_topic, parse_request_topic, parse_response_topic, parse_username,
    register_topic, response_topic, MqttRequest,
};
use dps_proto::query::{parse_query, Query, QuerySource};
use dps_proto::route::parse_route;
use dps_proto::sas::{build_token, ConnectionString, SasToken, SymmetricKey};
use dps_proto::{strict, ErrorCode, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// SAS tokens (HTTPS `Authorization`, MQTT password), symmetric keys and service connection strings.
///
/// A parsed token re-built with `build_token` over the same `sr`, expiry and key name parses to the same
/// fields and verifies with that key; verification of the original fails only with 401000/401001.
pub fn sas_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match SasToken::parse(&text) {
        Ok(token) => {
            let key = SymmetricKey::from_bytes(vec![7; 32]);
            let rebuilt = build_token(&key, token.resource_raw(), token.expiry(), token.key_name());
            let again =
                SasToken::parse(&rebuilt).unwrap_or_else(|e| panic!("{rebuilt:?} does not parse: {e}"));
            assert_eq!(again.resource_raw(), token.resource_raw());
            assert_eq!(again.expiry(), token.expiry());
            assert_eq!(again.key_name(), token.key_name());
            assert!(again.signature_matches(&key), "a rebuilt token does not verify: {rebuilt:?}");
            let target = token.resource_decoded();
            let now = Timestamp::from_unix_seconds(NOW);
            if let Err(e) = token.verify(now, &target, &[&key]) {
                assert_refusal("SasToken::verify", &e, &[ErrorCode::Unauthorized, ErrorCode::TokenExpired]);
            }
            if !token.is_expired(now) && token.audience_matches(&target) {
                assert_eq!(again.verify(now, &target, &[&key, &key]), Ok(0));
            }
        }
        Err(e) => assert_refusal("SasToken::parse", &e, &[ErrorCode::MalformedToken]),
    }
    match SymmetricKey::parse(&text) {
        Ok(key) => assert_eq!(SymmetricKey::parse(&key.to_base64()).as_ref(), Ok(&key)),
        Err(e) => {
            assert_refusal("SymmetricKey::parse", &e, &[ErrorCode::BadRequest, ErrorCode::InvalidEnrollment])
        }
    }
    match ConnectionString::parse(&text) {
        Ok(cs) => {
            let again = ConnectionString::parse(&cs.to_string()).unwrap();
            assert_eq!(again.host_name, cs.host_name);
            assert_eq!(again.key_name, cs.key_name);
            assert_eq!(again.key, cs.key);
            let token = cs.token(NOW + 60);
            let parsed = SasToken::parse(&token).unwrap();
            assert!(parsed.signature_matches(&cs.key));
            assert_eq!(parsed.key_name(), Some(cs.key_name.as_str()));
        }
        Err(e) => assert_refusal("ConnectionString::parse", &e, &[ErrorCode::BadRequest]),
    }
}

/// HTTPS routes: the first line is the method, the rest the request target (`/path?query`).
pub fn https_route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (method, target) = text.split_once('\n').unwrap_or(("GET", &text));
    match parse_route(method, target) {
        Ok(m) => {
            // Routing is a function of the request: the same request routes the same.
            assert_eq!(parse_route(method, target).as_ref(), Ok(&m));
            assert_eq!(m.route.is_device_api(), parse_route(method, target).unwrap().route.is_device_api());
        }
        Err(e) => assert_refusal(
            "parse_route",
            &e,
            &[
                ErrorCode::NotFound,
                ErrorCode::MethodNotAllowed,
                ErrorCode::InvalidIdentifier,
                ErrorCode::InvalidApiVersion,
                ErrorCode::BadRequest,
            ],
        ),
    }
}

/// MQTT usernames, request topics and response topics: each parsed value, written back with the crate's
/// builders, parses to the same value; a request's `$rid` is always echoable into a response topic.
pub fn mqtt_username_topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_username(&text) {
        Ok(u) => {
            if let Some(api) = &u.api_version {
                let built = build_username(
                    u.id_scope.as_str(),
                    u.registration_id.as_str(),
                    api.as_str(),
                    u.client_version.as_deref(),
                );
                let again =
                    parse_username(&built).unwrap_or_else(|e| panic!("{built:?} does not parse: {e}"));
                assert_eq!(again, u, "{built:?}");
            }
        }
        Err(e) => assert_refusal(
            "parse_username",
            &e,
            &[ErrorCode::BadRequest, ErrorCode::InvalidIdentifier, ErrorCode::InvalidApiVersion],
        ),
    }
    match parse_request_topic(&text) {
        Ok(request) => {
            let built = match &request {
                MqttRequest::Register { rid } => register_topic(rid),
                MqttRequest::OperationStatus { rid, operation_id } => {
                    operation_status_topic(rid, operation_id.as_str())
                }
            };
            let again =
                parse_request_topic(&built).unwrap_or_else(|e| panic!("{built:?} does not parse: {e}"));
            assert_eq!(again, request, "{built:?}");
            let response = response_topic(202, request.rid(), Some(3));
            let parsed = parse_response_topic(&response).unwrap();
            assert_eq!(
                (parsed.status, parsed.rid.as_str(), parsed.retry_after),
                (202, request.rid(), Some(3))
            );
        }
        Err(e) => assert_refusal(
            "parse_request_topic",
            &e,
            &[ErrorCode::NotFound, ErrorCode::BadRequest, ErrorCode::InvalidIdentifier],
        ),
    }
    match parse_response_topic(&text) {
        Ok(r) => {
            let built = response_topic(r.status, &r.rid, r.retry_after);
            let again =
                parse_response_topic(&built).unwrap_or_else(|e| panic!("{built:?} does not parse: {e}"));
            assert_eq!(again, r, "{built:?}");
        }
        Err(e) => assert_refusal("parse_response_topic", &e, &[ErrorCode::NotFound, ErrorCode::BadRequest]),
    }
}

/// One model: what `strict::from_slice` accepts, plain serde accepts too; and serialising, reading back
/// strictly and serialising again gives the same JSON (a model never writes what it cannot read).
fn model<T: DeserializeOwned + Serialize + Debug>(name: &str, data: &[u8]) {
    let Ok(value) = strict::from_slice::<T>(data) else { return };
    assert!(serde_json::from_slice::<T>(data).is_ok(), "{name}: strict accepts what serde refuses");
    let first =
        serde_json::to_vec(&value).unwrap_or_else(|e| panic!("{name}: {value:?} does not serialise: {e}"));
    let back = strict::from_slice::<T>(&first).unwrap_or_else(|e| {
        panic!("{name}: its own JSON {} does not read back: {e}", String::from_utf8_lossy(&first))
    });
    let second = serde_json::to_vec(&back).unwrap();
    assert_eq!(String::from_utf8_lossy(&first), String::from_utf8_lossy(&second), "{name}: not stable");
}

/// Every JSON wire model a peer sends (device and service API), through `strict::from_slice`.
pub fn wire_models(data: &[u8]) {
    model::<DeviceRegistration>("DeviceRegistration", data);
    model::<RegistrationOperationStatus>("RegistrationOperationStatus", data);
    model::<DeviceRegistrationResult>("DeviceRegistrationResult", data);
    model::<IndividualEnrollment>("IndividualEnrollment", data);
    model::<EnrollmentGroup>("EnrollmentGroup", data);
    model::<AttestationMechanism>("AttestationMechanism", data);
    model::<ReprovisionPolicy>("ReprovisionPolicy", data);
    model::<InitialTwin>("InitialTwin", data);
    model::<DeviceRegistrationState>("DeviceRegistrationState", data);
    model::<BulkEnrollmentOperation>("BulkEnrollmentOperation", data);
    model::<BulkEnrollmentGroupOperation>("BulkEnrollmentGroupOperation", data);
    model::<QuerySpecification>("QuerySpecification", data);
    model::<CertificateUpload>("CertificateUpload", data);
    model::<VerificationCertificate>("VerificationCertificate", data);
}

fn source_name(source: QuerySource) -> &'static str {
    match source {
        QuerySource::Enrollments => "enrollments",
        QuerySource::EnrollmentGroups => "enrollmentGroups",
        QuerySource::Registrations => "registrations",
    }
}

/// Writes a query back in canonical form, or `None` when a value holds all three quote characters.
fn write_query(q: &Query) -> Option<String> {
    let mut s = format!("SELECT * FROM {}", source_name(q.source));
    for (i, c) in q.conditions.iter().enumerate() {
        let quote = ['\'', '"', '`'].into_iter().find(|ch| !c.value.contains(*ch))?;
        s.push_str(if i == 0 { " WHERE " } else { " AND " });
        s.push_str(&format!("{} = {quote}{}{quote}", c.field, c.value));
    }
    Some(s)
}

/// The service query language: a parsed query written back canonically parses the same, and an item
/// holding exactly the queried values matches it.
pub fn query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_query(&text, QuerySource::Enrollments) {
        Ok(q) => {
            if let Some(written) = write_query(&q).filter(|w| w.len() <= 4096) {
                let again = parse_query(&written, QuerySource::Registrations)
                    .unwrap_or_else(|e| panic!("{written:?} does not parse: {e}"));
                assert_eq!(again, q, "{written:?}");
            }
            let mut item = serde_json::Map::new();
            let mut distinct = true;
            for c in &q.conditions {
                if item.keys().any(|k| k.eq_ignore_ascii_case(&c.field)) {
                    distinct = false;
                }
                item.insert(c.field.clone(), serde_json::Value::String(c.value.clone()));
            }
            if distinct {
                assert!(q.matches(&serde_json::Value::Object(item)), "{q:?}");
            }
            if !q.conditions.is_empty() {
                assert!(!q.matches(&serde_json::json!([])), "{q:?} matches a non-object");
            }
        }
        Err(e) => assert_refusal("parse_query", &e, &[ErrorCode::InvalidQuery]),
    }
}

/// Continuation tokens (`x-ms-continuation`): decoding is total, and a decoded key encodes to a token
/// that decodes to the same key; any key round-trips.
pub fn continuation(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(key) = parse_continuation_token(&text) {
        assert_eq!(parse_continuation_token(&continuation_token(&key)).as_deref(), Some(key.as_str()));
    }
    assert_eq!(parse_continuation_token(&continuation_token(&text)).as_deref(), Some(text.as_ref()));
}
