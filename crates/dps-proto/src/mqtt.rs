//! MQTT username and topic codecs of the device API (spec §2).
//!
//! - CONNECT username: `{idScope}/registrations/{registrationId}/api-version={ver}[&ClientVersion={ua}]`
//!   ([`parse_username`], [`build_username`]).
//! - Requests (device → service): `$dps/registrations/PUT/iotdps-register/?$rid={rid}` and
//!   `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}`
//!   ([`parse_request_topic`], [`register_topic`], [`operation_status_topic`]).
//! - Responses (service → device): `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`
//!   ([`response_topic`], [`parse_response_topic`]).
//!
//! The codecs look only at topic names and usernames, so they are the same whatever QoS a client uses.

use crate::error::{DpsError, ErrorCode};
use crate::id::{ApiVersion, IdScope, OperationId, RegistrationId};
use crate::sas::encode_resource;
use percent_encoding::percent_decode_str;
use std::borrow::Cow;

/// The only topic filter devices subscribe to (spec §2.3).
pub const RESPONSE_TOPIC_FILTER: &str = "$dps/registrations/res/#";

/// The topic path of a register request (the query string follows).
const REGISTER_PATH: &str = "$dps/registrations/PUT/iotdps-register";
/// The topic path of an operation status request (the query string follows).
const OPERATION_STATUS_PATH: &str = "$dps/registrations/GET/iotdps-get-operationstatus";
/// The prefix of response topics, followed by the status.
const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

/// The longest accepted `$rid`, in bytes.
pub const MAX_RID_BYTES: usize = 128;

/// A parsed MQTT CONNECT username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUsername {
    /// The ID scope (before `/registrations/`).
    pub id_scope: IdScope,
    /// The registration ID (must also be the client ID; for X.509, the certificate CN).
    pub registration_id: RegistrationId,
    /// `api-version`, if present (the first one wins).
    pub api_version: Option<ApiVersion>,
    /// `ClientVersion`, percent-decoded; `None` when absent or empty.
    pub client_version: Option<String>,
}

fn decode(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

fn shown(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() > MAX {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// Splits a query string into `(key, value)` pairs: on `&`, then on the first `=`; empty pairs are skipped
/// and a pair without `=` has an empty value. Nothing is decoded.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Parses a CONNECT username (spec §2.2).
///
/// Recipe: split at the first `/registrations/` (ASCII case-insensitive): the ID scope is before it; the rest
/// is split at the first `/` into the registration ID and a query string (a leading `?` is tolerated), which
/// is split on `&` and `=` and percent-decoded. Unknown keys are ignored, `api-version` may be missing, and
/// the Java SDK's `ClientVersion=2019-03-31` is just a client version. Scope and registration ID are
/// percent-decoded once before validation.
///
/// Errors: [`ErrorCode::BadRequest`] when there is no `/registrations/`, [`ErrorCode::InvalidIdentifier`] for
/// a bad scope or registration ID, [`ErrorCode::InvalidApiVersion`] for a malformed `api-version`.
pub fn parse_username(s: &str) -> Result<MqttUsername, DpsError> {
    const SEP: &str = "/registrations/";
    // ASCII lowercasing keeps byte offsets, so the index is valid in `s`.
    let at = s.to_ascii_lowercase().find(SEP).ok_or_else(|| {
        DpsError::with_message(
            ErrorCode::BadRequest,
            format!(
                "the MQTT username '{}' is not '{{idScope}}/registrations/{{registrationId}}/api-version=…'",
                shown(s)
            ),
        )
    })?;
    let scope = &s[..at];
    let rest = &s[at + SEP.len()..];
    let (id, query) = rest.split_once('/').unwrap_or((rest, ""));
    let query = query.strip_prefix('?').unwrap_or(query);

    let id_scope = IdScope::parse(&decode(scope))?;
    let registration_id = RegistrationId::parse(&decode(id))?;

    let mut api_version = None;
    let mut client_version = None;
    let mut seen_api_version = false;
    let mut seen_client_version = false;
    for (k, v) in query_pairs(query) {
        let key = decode(k);
        if key.eq_ignore_ascii_case("api-version") && !seen_api_version {
            seen_api_version = true;
            api_version = Some(ApiVersion::parse(&decode(v))?);
        } else if key.eq_ignore_ascii_case("ClientVersion") && !seen_client_version {
            seen_client_version = true;
            let value = decode(v);
            client_version = (!value.is_empty()).then(|| value.into_owned());
        }
    }
    Ok(MqttUsername { id_scope, registration_id, api_version, client_version })
}

/// Builds a CONNECT username
/// `{idScope}/registrations/{registrationId}/api-version={ver}[&ClientVersion={ua}]`, percent-encoding the
/// client version (as the C# SDK does).
pub fn build_username(
    id_scope: &str,
    registration_id: &str,
    api_version: &str,
    client_version: Option<&str>,
) -> String {
    let mut s = format!("{id_scope}/registrations/{registration_id}/api-version={api_version}");
    if let Some(cv) = client_version {
        s.push_str("&ClientVersion=");
        s.push_str(&encode_resource(cv));
    }
    s
}

/// A device request, recognised from its PUBLISH topic (the payload is not looked at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttRequest {
    /// `$dps/registrations/PUT/iotdps-register/?$rid={rid}`.
    Register {
        /// The request ID, verbatim; echo it in the response topic.
        rid: String,
    },
    /// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}`.
    OperationStatus {
        /// The request ID, verbatim; echo it in the response topic.
        rid: String,
        /// The operation being polled (percent-decoded).
        operation_id: OperationId,
    },
}

impl MqttRequest {
    /// The request ID to echo in the response.
    pub fn rid(&self) -> &str {
        match self {
            MqttRequest::Register { rid } | MqttRequest::OperationStatus { rid, .. } => rid,
        }
    }
}

fn bad_request(message: String) -> DpsError {
    DpsError::with_message(ErrorCode::BadRequest, message)
}

/// Checks a `$rid` as sent: non-empty, at most [`MAX_RID_BYTES`] bytes, none of `$ & # + /` and no control
/// characters (it is echoed into a response topic that clients parse).
fn check_rid(rid: &str) -> Result<(), DpsError> {
    if rid.is_empty() {
        return Err(bad_request("the request topic's $rid is empty".to_owned()));
    }
    if rid.len() > MAX_RID_BYTES {
        return Err(bad_request(format!(
            "the request topic's $rid is {} bytes long; at most {MAX_RID_BYTES} are allowed",
            rid.len()
        )));
    }
    if let Some(c) = rid.chars().find(|c| matches!(c, '$' | '&' | '#' | '+' | '/') || c.is_control()) {
        return Err(bad_request(format!(
            "the request topic's $rid '{}' contains the character {c:?}, which is not allowed",
            shown(rid)
        )));
    }
    Ok(())
}

/// Recognises a device request topic (spec §2.4, §2.5).
///
/// Parameters may come in any order; `$rid` is required and kept verbatim; `operationId` is percent-decoded
/// (the Python SDK URL-quotes it); unknown parameters are ignored. A trailing `/` before `?` is optional.
///
/// Errors: [`ErrorCode::NotFound`] for an unknown topic, [`ErrorCode::BadRequest`] for a missing, repeated or
/// invalid `$rid` or a missing `operationId`, [`ErrorCode::InvalidIdentifier`] for a bad operation ID.
pub fn parse_request_topic(topic: &str) -> Result<MqttRequest, DpsError> {
    let (path, query) = topic.split_once('?').unwrap_or((topic, ""));
    let path = path.strip_suffix('/').unwrap_or(path);
    let is_register = path.eq_ignore_ascii_case(REGISTER_PATH);
    if !is_register && !path.eq_ignore_ascii_case(OPERATION_STATUS_PATH) {
        return Err(DpsError::with_message(
            ErrorCode::NotFound,
            format!("unknown MQTT topic '{}'", shown(topic)),
        ));
    }

    let mut rid: Option<&str> = None;
    let mut operation_id: Option<&str> = None;
    for (k, v) in query_pairs(query) {
        if k == "$rid" {
            if rid.is_some() {
                return Err(bad_request(format!("the topic '{}' has more than one $rid", shown(topic))));
            }
            rid = Some(v);
        } else if k.eq_ignore_ascii_case("operationId") && operation_id.is_none() {
            operation_id = Some(v);
        }
    }
    let rid =
        rid.ok_or_else(|| bad_request(format!("the topic '{}' has no $rid parameter", shown(topic))))?;
    check_rid(rid)?;

    if is_register {
        return Ok(MqttRequest::Register { rid: rid.to_owned() });
    }
    let op = operation_id
        .ok_or_else(|| bad_request(format!("the topic '{}' has no operationId parameter", shown(topic))))?;
    let operation_id = OperationId::parse(&decode(op))?;
    Ok(MqttRequest::OperationStatus { rid: rid.to_owned(), operation_id })
}

/// The topic of a register request with request ID `rid`.
pub fn register_topic(rid: &str) -> String {
    format!("{REGISTER_PATH}/?$rid={rid}")
}

/// The topic of an operation status request (the operation ID is percent-encoded if it needs it).
pub fn operation_status_topic(rid: &str, operation_id: &str) -> String {
    format!("{OPERATION_STATUS_PATH}/?$rid={rid}&operationId={}", encode_resource(operation_id))
}

/// The topic of a response: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]` — `$rid` first
/// and lowercase `retry-after` second, which every SDK's parser accepts (spec §2.6).
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    match retry_after {
        Some(n) => format!("{RESPONSE_PREFIX}{status}/?$rid={rid}&retry-after={n}"),
        None => format!("{RESPONSE_PREFIX}{status}/?$rid={rid}"),
    }
}

/// A parsed response topic (for device-side clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttResponse {
    /// The HTTP-equivalent status.
    pub status: u16,
    /// The request ID being answered, verbatim.
    pub rid: String,
    /// `retry-after` in seconds, if present and a valid number.
    pub retry_after: Option<u32>,
}

/// Parses a response topic `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]`.
///
/// Parameters may come in any order; the `retry-after` key is case-insensitive and an unparsable value is
/// ignored (as lenient SDK parsers do). Errors: [`ErrorCode::NotFound`] when the topic is not a response
/// topic, [`ErrorCode::BadRequest`] for a bad status or a missing or empty `$rid`.
pub fn parse_response_topic(topic: &str) -> Result<MqttResponse, DpsError> {
    let n = RESPONSE_PREFIX.len();
    let rest = match (topic.get(..n), topic.get(n..)) {
        (Some(prefix), Some(rest)) if prefix.eq_ignore_ascii_case(RESPONSE_PREFIX) => rest,
        _ => {
            return Err(DpsError::with_message(
                ErrorCode::NotFound,
                format!("'{}' is not a response topic", shown(topic)),
            ))
        }
    };
    let (status_text, query) = rest.split_once('?').unwrap_or((rest, ""));
    let status_text = status_text.strip_suffix('/').unwrap_or(status_text);
    let status = status_text
        .parse::<u16>()
        .ok()
        .filter(|_| status_text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad_request(format!("the response topic '{}' has no numeric status", shown(topic))))?;

    let mut rid: Option<&str> = None;
    let mut retry_after: Option<u32> = None;
    let mut seen_retry = false;
    for (k, v) in query_pairs(query) {
        if k == "$rid" && rid.is_none() {
            rid = Some(v);
        } else if k.eq_ignore_ascii_case("retry-after") && !seen_retry {
            seen_retry = true;
            retry_after = v.trim().parse::<u32>().ok();
        }
    }
    let rid = rid
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad_request(format!("the response topic '{}' has no $rid", shown(topic))))?;
    Ok(MqttResponse { status, rid: rid.to_owned(), retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "4.d0a671905ea5b2c8.e7173b7b-0e54-4aa0-9d20-aeb1b89e6c7d";

    fn user(s: &str) -> MqttUsername {
        parse_username(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn username_sdk_variants() {
        // C SDK: raw ClientVersion.
        let u = user("0ne00002193/registrations/dev1/api-version=2021-06-01&ClientVersion=1.15.0");
        assert_eq!(u.id_scope, IdScope::parse("0ne00002193").unwrap());
        assert_eq!(u.registration_id.as_str(), "dev1");
        assert_eq!(u.api_version, Some(ApiVersion::V2021_06_01));
        assert_eq!(u.client_version.as_deref(), Some("1.15.0"));

        // C# SDK: Uri.EscapeDataString(ProductInfo).
        let u = user(
            "0ne00002193/registrations/dev1/api-version=2019-03-31&ClientVersion=Microsoft.Azure.Devices.Provisioning.Client%2F1.19.0%20%28.NET%206.0%3B%20Linux%3B%20X64%29",
        );
        assert_eq!(u.api_version, Some(ApiVersion::V2019_03_31));
        assert_eq!(
            u.client_version.as_deref(),
            Some("Microsoft.Azure.Devices.Provisioning.Client/1.19.0 (.NET 6.0; Linux; X64)")
        );

        // Python SDK: urlencode(quote_via=quote).
        let u = user(
            "0ne00002193/registrations/dev1/api-version=2019-03-31&ClientVersion=py-azure-iot-device%2F2.13.0%28Python%203.11%3BLinux%29",
        );
        assert_eq!(u.client_version.as_deref(), Some("py-azure-iot-device/2.13.0(Python 3.11;Linux)"));

        // Java SDK: the api version twice (as ClientVersion).
        let u = user("0ne00002193/registrations/dev1/api-version=2019-03-31&ClientVersion=2019-03-31");
        assert_eq!(u.api_version, Some(ApiVersion::V2019_03_31));
        assert_eq!(u.client_version.as_deref(), Some("2019-03-31"));

        // Embedded C and the docs: no ClientVersion (Appendix A.2).
        let u = user("0ne00002193/registrations/paho-sample-device1/api-version=2019-03-31");
        assert_eq!(u.registration_id.as_str(), "paho-sample-device1");
        assert_eq!(u.api_version, Some(ApiVersion::V2019_03_31));
        assert_eq!(u.client_version, None);
    }

    #[test]
    fn username_tolerance() {
        // No api-version at all, with or without the trailing '/'.
        let u = user("0ne00002193/registrations/dev1");
        assert_eq!((u.api_version, u.client_version), (None, None));
        assert_eq!(user("0ne00002193/registrations/dev1/").api_version, None);
        // Unknown keys, a leading '?', odd key casing, a raw '/' inside the client version.
        let u = user("0ne00002193/registrations/dev1/?foo=1&API-VERSION=2021-10-01&clientversion=a/b c&x");
        assert_eq!(u.api_version, Some(ApiVersion::V2021_10_01));
        assert_eq!(u.client_version.as_deref(), Some("a/b c"));
        assert_eq!(
            user("0ne00002193/registrations/dev1/api-version=2019-03-31&ClientVersion=").client_version,
            None
        );
        // First api-version wins; '+' stays a plus.
        let u = user(
            "0ne00002193/REGISTRATIONS/Dev1/api-version=2019-03-31&api-version=2021-06-01&ClientVersion=a+b",
        );
        assert_eq!(u.api_version, Some(ApiVersion::V2019_03_31));
        assert_eq!(u.client_version.as_deref(), Some("a+b"));
        assert_eq!(u.registration_id.as_str(), "Dev1");
        // Percent-encoded IDs (as C URL-encodes them over HTTP).
        assert_eq!(user("0ne00002193/registrations/dev%2D1").registration_id.as_str(), "dev-1");
    }

    #[test]
    fn username_errors() {
        for (s, code) in [
            ("", ErrorCode::BadRequest),
            ("dev1", ErrorCode::BadRequest),
            ("0ne00002193/devices/dev1/api-version=2019-03-31", ErrorCode::BadRequest),
            ("bad/registrations/dev1/api-version=2019-03-31", ErrorCode::InvalidIdentifier),
            ("0ne00002193/registrations//api-version=2019-03-31", ErrorCode::InvalidIdentifier),
            ("0ne00002193/registrations/dev%2F1/api-version=2019-03-31", ErrorCode::InvalidIdentifier),
            ("0ne00002193/registrations/dev1/api-version=soon", ErrorCode::InvalidApiVersion),
        ] {
            assert_eq!(parse_username(s).unwrap_err().code, code, "{s}");
        }
    }

    #[test]
    fn build_username_round_trips() {
        let s =
            build_username("0ne00002193", "dev1", "2019-03-31", Some("azure-iot-device/2.0 (Python; Linux)"));
        assert_eq!(
            s,
            "0ne00002193/registrations/dev1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.0%20%28Python%3B%20Linux%29"
        );
        let u = user(&s);
        assert_eq!(u.client_version.as_deref(), Some("azure-iot-device/2.0 (Python; Linux)"));
        assert_eq!(
            build_username("0ne00002193", "dev1", "2019-03-31", None),
            "0ne00002193/registrations/dev1/api-version=2019-03-31"
        );
    }

    #[test]
    fn appendix_a2_topics() {
        assert_eq!(RESPONSE_TOPIC_FILTER, "$dps/registrations/res/#");
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=1").unwrap(),
            MqttRequest::Register { rid: "1".to_owned() }
        );
        let t = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId={OP}");
        assert_eq!(
            parse_request_topic(&t).unwrap(),
            MqttRequest::OperationStatus {
                rid: "1".to_owned(),
                operation_id: OperationId::parse(OP).unwrap()
            }
        );
        assert_eq!(response_topic(202, "1", Some(3)), "$dps/registrations/res/202/?$rid=1&retry-after=3");
        assert_eq!(response_topic(200, "1", None), "$dps/registrations/res/200/?$rid=1");
        assert_eq!(response_topic(401, "1", None), "$dps/registrations/res/401/?$rid=1");
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=1&retry-after=3").unwrap(),
            MqttResponse { status: 202, rid: "1".to_owned(), retry_after: Some(3) }
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/401/?$rid=1").unwrap(),
            MqttResponse { status: 401, rid: "1".to_owned(), retry_after: None }
        );
        assert_eq!(register_topic("1"), "$dps/registrations/PUT/iotdps-register/?$rid=1");
        assert_eq!(operation_status_topic("1", OP), t);
    }

    #[test]
    fn sdk_rid_and_operation_id_styles() {
        // Python: uuid4 rid, URL-quoted operationId (quote() leaves '.' and '-' alone; some encoders don't).
        let rid = "a3c9b0f2-4b1e-4f6a-9d3e-2f1c0b9a8e7d";
        let quoted = OP.replace('.', "%2E").replace('-', "%2d");
        let t = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={quoted}");
        let req = parse_request_topic(&t).unwrap();
        assert_eq!(
            req,
            MqttRequest::OperationStatus {
                rid: rid.to_owned(),
                operation_id: OperationId::parse(OP).unwrap()
            }
        );
        assert_eq!(req.rid(), rid);
        // Parameters in any order, unknown ones ignored.
        let t = format!("$dps/registrations/GET/iotdps-get-operationstatus/?operationId={OP}&x=y&$rid=42");
        assert_eq!(parse_request_topic(&t).unwrap().rid(), "42");
        let t = "$dps/registrations/PUT/iotdps-register/?foo&$rid=7&operationId=ignored";
        assert_eq!(parse_request_topic(t).unwrap(), MqttRequest::Register { rid: "7".to_owned() });
        // rid is kept verbatim (not decoded).
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=a%20b").unwrap().rid(),
            "a%20b"
        );
        // The trailing '/' before '?' is optional.
        assert_eq!(parse_request_topic("$dps/registrations/PUT/iotdps-register?$rid=1").unwrap().rid(), "1");
        // Rids are echoed into response topics that round-trip.
        let back = parse_response_topic(&response_topic(202, rid, Some(2))).unwrap();
        assert_eq!((back.status, back.rid.as_str(), back.retry_after), (202, rid, Some(2)));
    }

    #[test]
    fn request_topic_errors() {
        let long = "9".repeat(129);
        let cases = [
            ("$dps/registrations/POST/iotdps-register/?$rid=1", ErrorCode::NotFound),
            ("$dps/registrations/res/200/?$rid=1", ErrorCode::NotFound),
            ("devices/x/messages/events/", ErrorCode::NotFound),
            ("", ErrorCode::NotFound),
            ("$dps/registrations/PUT/iotdps-register/", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?rid=1", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=a$b", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=a#b", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=a+b", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=a/b", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=a\u{0}b", ErrorCode::BadRequest),
            ("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1", ErrorCode::BadRequest),
            (
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=",
                ErrorCode::InvalidIdentifier,
            ),
            (
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=a%2Fb",
                ErrorCode::InvalidIdentifier,
            ),
        ];
        for (t, code) in cases {
            assert_eq!(parse_request_topic(t).unwrap_err().code, code, "{t}");
        }
        let t = format!("$dps/registrations/PUT/iotdps-register/?$rid={long}");
        assert_eq!(parse_request_topic(&t).unwrap_err().code, ErrorCode::BadRequest);
        let ok = format!("$dps/registrations/PUT/iotdps-register/?$rid={}", &long[..128]);
        assert!(parse_request_topic(&ok).is_ok());
        let e = parse_request_topic("some/unknown/topic").unwrap_err();
        assert!(e.message.contains("some/unknown/topic"), "{}", e.message);
    }

    #[test]
    fn response_topic_parsing() {
        let r = parse_response_topic("$dps/registrations/res/429/?retry-after=10&$rid=abc").unwrap();
        assert_eq!(r, MqttResponse { status: 429, rid: "abc".to_owned(), retry_after: Some(10) });
        let r = parse_response_topic("$dps/registrations/res/202/?$rid=1&Retry-After=5").unwrap();
        assert_eq!(r.retry_after, Some(5));
        let r = parse_response_topic("$dps/registrations/res/202/?$rid=1&retry-after=soon").unwrap();
        assert_eq!(r.retry_after, None);
        let r = parse_response_topic("$dps/registrations/res/500?$rid=1").unwrap();
        assert_eq!(r.status, 500);
        for (t, code) in [
            ("$dps/registrations/res/abc/?$rid=1", ErrorCode::BadRequest),
            ("$dps/registrations/res/+200/?$rid=1", ErrorCode::BadRequest),
            ("$dps/registrations/res//?$rid=1", ErrorCode::BadRequest),
            ("$dps/registrations/res/99999/?$rid=1", ErrorCode::BadRequest),
            ("$dps/registrations/res/200/", ErrorCode::BadRequest),
            ("$dps/registrations/res/200/?$rid=", ErrorCode::BadRequest),
            ("$dps/registrations/PUT/iotdps-register/?$rid=1", ErrorCode::NotFound),
            ("$dps/reg", ErrorCode::NotFound),
            ("é$dps/registrations/res/200/?$rid=1", ErrorCode::NotFound),
        ] {
            assert_eq!(parse_response_topic(t).unwrap_err().code, code, "{t}");
        }
    }
}
