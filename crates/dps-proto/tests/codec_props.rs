//! Property tests of the pure codecs: round trips of everything we build, and no panics on any input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_proto::id::{DeviceId, Etag, IfMatch};
use dps_proto::mqtt::{
    build_username, operation_status_topic, parse_request_topic, parse_response_topic, parse_username,
    register_topic, response_topic, MqttRequest, MqttResponse,
};
use dps_proto::route::{parse_route, Route};
use dps_proto::sas::{build_token, device_resource, encode_resource, SasToken, SymmetricKey};
use dps_proto::{ApiVersion, EnrollmentGroupId, ErrorCode, IdScope, OperationId, RegistrationId, Timestamp};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------------------

/// Valid registration / group IDs (spec §11.1), mostly short, sometimes up to the 128-character limit.
fn reg_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9]([A-Za-z0-9._:-]{0,30}[A-Za-z0-9-])?",
        1 => "[A-Za-z0-9][A-Za-z0-9._:-]{100,126}[A-Za-z0-9-]",
    ]
}

fn scope() -> impl Strategy<Value = String> {
    "0[nN][eE][0-9a-fA-F]{8}"
}

fn op_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,128}"
}

fn api_version() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("2019-03-31".to_owned()),
        Just("2021-06-01".to_owned()),
        Just("2025-07-01-preview".to_owned()),
        "20[0-9]{2}-[01][0-9]-[0-3][0-9](-[a-z0-9]{1,10})?",
    ]
}

/// Request IDs as SDKs send them: integers, UUIDs, and arbitrary text without `$ & # + /` or controls.
fn rid() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        "[^$&#+/\\p{Cc}]{1,30}",
    ]
}

/// Any text: arbitrary Unicode, regex `.*`, byte soup, and near-valid shapes for each codec.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        ".*",
        vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        vec(any::<u8>(), 0..256).prop_map(|b| b.into_iter().map(char::from).collect()),
        "[A-Za-z0-9%&=/?$#+ .:_~-]{0,200}",
        "((SharedAccessSignature|sharedaccesssignature) )?((sr|sig|se|skn|SR|Sig|x)=[A-Za-z0-9%/+=.&-]{0,50}&?){0,6}",
        "(/|0ne[0-9a-fA-F]{8}|registrations|enrollments|enrollmentGroups|query|register|operations|attestationmechanism|[a-z%0-9.:_-]{0,10}|\\?|&|=|api-version|forceRegistration|true)*",
        "\\$dps/registrations/(PUT/iotdps-register|GET/iotdps-get-operationstatus|res/[0-9]{0,6}|[a-z]{0,5})/?\\??((\\$rid|operationId|retry-after|Retry-After)=[^&]{0,20}&?){0,4}",
        "(0ne[0-9a-f]{8}|[a-z]{0,5})(/registrations/|/)[a-z0-9%.-]{0,20}/?((api-version|ClientVersion)=[^&]{0,20}&?){0,3}",
    ]
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("PUT".to_owned()),
        Just("POST".to_owned()),
        Just("DELETE".to_owned()),
        "[A-Za-z]{0,8}",
        any::<String>(),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// Lowercases the hex digits of every `%XX` escape (the C SDK's encoding).
fn lower_hex_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3).unwrap_or(&rest[i..]);
        out.push_str(&esc.to_ascii_lowercase());
        rest = &rest[i + esc.len()..];
    }
    out.push_str(rest);
    out
}

/// Flips the ASCII case of the characters whose bit is set in `mask` (cycling through its 64 bits).
fn vary_case(s: &str, mask: u64) -> String {
    s.chars().enumerate().map(|(i, c)| if mask >> (i % 64) & 1 == 1 { flip_case(c) } else { c }).collect()
}

fn flip_case(c: char) -> char {
    if c.is_ascii_lowercase() {
        c.to_ascii_uppercase()
    } else {
        c.to_ascii_lowercase()
    }
}

/// Percent-encodes the characters whose bit is set in `mask`, with upper- or lowercase hex.
fn encode_some(s: &str, mask: u64, lower: bool) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                let e = format!("%{:02X}", c as u32);
                if lower {
                    e.to_ascii_lowercase()
                } else {
                    e
                }
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn other_key(key: &[u8]) -> SymmetricKey {
    let mut k = key.to_vec();
    k[0] ^= 0x01;
    SymmetricKey::from_bytes(k)
}

// ---------------------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn device_token_round_trip(
        key in vec(any::<u8>(), 16..=64),
        scope in scope(),
        id in reg_id(),
        se in 0i64..=4_102_444_800,
        style in 0u8..3,
        skn in option::of("[a-z]{0,12}"),
    ) {
        let key_bytes = key;
        let key = SymmetricKey::from_bytes(key_bytes.clone());
        let resource = device_resource(&scope, &id);
        let sr = match style {
            0 => resource.clone(),
            1 => encode_resource(&resource),
            _ => lower_hex_escapes(&encode_resource(&resource)),
        };
        let header = build_token(&key, &sr, se, skn.as_deref());
        let token = SasToken::parse(&header).unwrap();
        prop_assert_eq!(token.resource_raw(), sr.as_str());
        prop_assert_eq!(token.resource_decoded(), resource.clone());
        prop_assert_eq!(token.expiry(), se);
        prop_assert_eq!(token.key_name(), skn.as_deref().filter(|s| !s.is_empty()));
        prop_assert!(token.signature_matches(&key));
        let wrong = other_key(&key_bytes);
        prop_assert!(!token.signature_matches(&wrong));

        let now = Timestamp::from_unix_seconds(se);
        prop_assert_eq!(token.verify(now, &resource, &[&key]), Ok(0));
        prop_assert_eq!(token.verify(now, &resource, &[&wrong, &key]), Ok(1));
        prop_assert_eq!(token.verify(now, &resource.to_ascii_uppercase(), &[&key]), Ok(0));
        prop_assert_eq!(token.verify(now, &resource, &[&wrong]).unwrap_err().code, ErrorCode::Unauthorized);
        prop_assert_eq!(
            token.verify(now, &format!("{resource}x"), &[&key]).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        prop_assert!(token.verify(Timestamp::from_unix_seconds(se + 300), &resource, &[&key]).is_ok());
        prop_assert_eq!(
            token.verify(Timestamp::from_unix_seconds(se + 301), &resource, &[&key]).unwrap_err().code,
            ErrorCode::TokenExpired
        );

        // The token without its prefix (an MQTT password) verifies the same.
        let bare = header.trim_start_matches("SharedAccessSignature ");
        prop_assert_eq!(SasToken::parse(bare).unwrap().verify(now, &resource, &[&key]), Ok(0));
    }

    #[test]
    fn service_token_round_trip(
        key in vec(any::<u8>(), 16..=64),
        host in "[a-z0-9]{1,20}\\.azure-devices-provisioning\\.net",
        path in "(/[a-zA-Z0-9-]{1,10}){0,3}",
        se in 0i64..=4_102_444_800,
        policy in "[a-zA-Z]{1,20}",
    ) {
        let key = SymmetricKey::from_bytes(key);
        let header = build_token(&key, &encode_resource(&host), se, Some(&policy));
        let token = SasToken::parse(&header).unwrap();
        prop_assert_eq!(token.key_name(), Some(policy.as_str()));
        let target = format!("{host}{path}");
        prop_assert_eq!(token.verify(Timestamp::from_unix_seconds(se - 1000), &target, &[&key]), Ok(0));
    }

    #[test]
    fn symmetric_key_base64_round_trip(bytes in vec(any::<u8>(), 16..=64), id in reg_id()) {
        let key = SymmetricKey::parse(&SymmetricKey::from_bytes(bytes.clone()).to_base64()).unwrap();
        prop_assert_eq!(key.as_bytes(), bytes.as_slice());
        let derived = key.derive_device_key(&id);
        prop_assert_eq!(derived.as_bytes().len(), 32);
        prop_assert_eq!(SymmetricKey::parse(&derived.to_base64()).unwrap(), derived);
    }

    #[test]
    fn username_round_trip(
        scope in scope(),
        id in reg_id(),
        api in api_version(),
        client in option::of(any::<String>()),
    ) {
        let s = build_username(&scope, &id, &api, client.as_deref());
        let u = parse_username(&s).unwrap();
        prop_assert_eq!(u.id_scope.as_str(), scope.as_str());
        prop_assert_eq!(u.registration_id.as_str(), id.as_str());
        prop_assert_eq!(u.api_version.as_ref().map(ApiVersion::as_str), Some(api.as_str()));
        prop_assert_eq!(u.client_version, client.filter(|c| !c.is_empty()));
    }

    #[test]
    fn request_topic_round_trip(rid in rid(), op in op_id()) {
        prop_assert_eq!(
            parse_request_topic(&register_topic(&rid)).unwrap(),
            MqttRequest::Register { rid: rid.clone() }
        );
        prop_assert_eq!(
            parse_request_topic(&operation_status_topic(&rid, &op)).unwrap(),
            MqttRequest::OperationStatus { rid: rid.clone(), operation_id: OperationId::parse(&op).unwrap() }
        );
    }

    #[test]
    fn response_topic_round_trip(status in any::<u16>(), rid in rid(), retry in option::of(any::<u32>())) {
        let topic = response_topic(status, &rid, retry);
        prop_assert!(topic.starts_with("$dps/registrations/res/"));
        let expected = MqttResponse { status, rid, retry_after: retry };
        prop_assert_eq!(parse_response_topic(&topic).unwrap(), expected);
    }

    #[test]
    fn device_routes_round_trip(
        scope in scope(),
        id in reg_id(),
        op in op_id(),
        case_mask in any::<u64>(),
        enc_mask in any::<u64>(),
        lower in any::<bool>(),
        force in option::of(any::<bool>()),
    ) {
        let lit = |s: &str| vary_case(s, case_mask);
        let enc = |s: &str| encode_some(s, enc_mask, lower);
        let query = match force {
            Some(f) => format!("?api-version=2021-06-01&forceRegistration={f}"),
            None => "?api-version=2021-06-01".to_owned(),
        };
        let base = format!("/{}/{}/{}", enc(&scope), lit("registrations"), enc(&id));

        let m = parse_route(&lit("put"), &format!("{base}/{}{query}", lit("register"))).unwrap();
        prop_assert_eq!(m.api_version, Some(ApiVersion::V2021_06_01));
        prop_assert_eq!(m.force_registration, force == Some(true));
        match m.route {
            Route::Register { id_scope, registration_id } => {
                prop_assert_eq!(id_scope.as_str(), scope.as_str());
                prop_assert_eq!(registration_id.as_str(), id.as_str());
            }
            other => prop_assert!(false, "{:?}", other),
        }

        let m = parse_route("GET", &format!("{base}/{}/{}", lit("operations"), enc(&op))).unwrap();
        match m.route {
            Route::OperationStatus { id_scope, registration_id, operation_id } => {
                prop_assert_eq!(id_scope.as_str(), scope.as_str());
                prop_assert_eq!(registration_id.as_str(), id.as_str());
                prop_assert_eq!(operation_id.as_str(), op.as_str());
            }
            other => prop_assert!(false, "{:?}", other),
        }

        let m = parse_route("POST", &format!("{base}/")).unwrap();
        prop_assert!(m.route.is_device_api());
        prop_assert_eq!(
            m.route,
            Route::StatusLookup {
                id_scope: IdScope::parse(&scope).unwrap(),
                registration_id: RegistrationId::parse(&id).unwrap(),
            }
        );
    }

    #[test]
    fn service_routes_round_trip(
        id in reg_id(),
        case_mask in any::<u64>(),
        enc_mask in any::<u64>(),
        lower in any::<bool>(),
    ) {
        let lit = |s: &str| vary_case(s, case_mask);
        let e = encode_some(&id, enc_mask, lower);
        let rid = RegistrationId::parse(&id).unwrap();
        let gid = EnrollmentGroupId::parse(&id).unwrap();
        let enr = lit("enrollments");
        let grp = lit("enrollmentGroups");
        let regs = lit("registrations");
        let att = lit("attestationmechanism");
        let cases = [
            ("GET", format!("/{enr}/{e}"), Route::GetEnrollment { id: rid.clone() }),
            ("PUT", format!("/{enr}/{e}"), Route::PutEnrollment { id: rid.clone() }),
            ("DELETE", format!("/{enr}/{e}"), Route::DeleteEnrollment { id: rid.clone() }),
            ("POST", format!("/{enr}/{e}/{att}"), Route::EnrollmentAttestation { id: rid.clone() }),
            ("GET", format!("/{grp}/{e}"), Route::GetEnrollmentGroup { id: gid.clone() }),
            ("PUT", format!("/{grp}/{e}"), Route::PutEnrollmentGroup { id: gid.clone() }),
            ("DELETE", format!("/{grp}/{e}"), Route::DeleteEnrollmentGroup { id: gid.clone() }),
            ("POST", format!("/{grp}/{e}/{att}"), Route::EnrollmentGroupAttestation { id: gid.clone() }),
            ("GET", format!("/{regs}/{e}"), Route::GetRegistration { id: rid.clone() }),
            ("DELETE", format!("/{regs}/{e}"), Route::DeleteRegistration { id: rid.clone() }),
            (
                "POST",
                format!("/{regs}/{e}/{}", lit("query")),
                Route::QueryRegistrations { group_id: gid.clone() },
            ),
        ];
        for (method, path, expected) in cases {
            let target = format!("{path}?api-version=2021-10-01&unknown=1");
            let m = parse_route(method, &target).unwrap();
            prop_assert!(!m.route.is_device_api());
            // The IDs come back exactly as sent (case included), not just equal ignoring case.
            let echoed = match &m.route {
                Route::GetEnrollment { id }
                | Route::PutEnrollment { id }
                | Route::DeleteEnrollment { id }
                | Route::EnrollmentAttestation { id }
                | Route::GetRegistration { id }
                | Route::DeleteRegistration { id } => id.as_str().to_owned(),
                Route::GetEnrollmentGroup { id }
                | Route::PutEnrollmentGroup { id }
                | Route::DeleteEnrollmentGroup { id }
                | Route::EnrollmentGroupAttestation { id }
                | Route::QueryRegistrations { group_id: id } => id.as_str().to_owned(),
                other => { prop_assert!(false, "{:?}", other); String::new() }
            };
            prop_assert_eq!(echoed, id.clone());
            prop_assert_eq!(m.route, expected, "{} {}", method, target);
        }
        for (path, expected) in [
            (format!("/{enr}"), Route::BulkEnrollments),
            (format!("/{enr}/{}", lit("query")), Route::QueryEnrollments),
            (format!("/{grp}"), Route::BulkEnrollmentGroups),
            (format!("/{grp}/{}", lit("query")), Route::QueryEnrollmentGroups),
        ] {
            prop_assert_eq!(parse_route("POST", &path).unwrap().route, expected);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// No panics on any input
// ---------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sas_parse_never_panics(s in arb_text(), target in arb_text(), now in any::<i64>()) {
        if let Ok(token) = SasToken::parse(&s) {
            let key = SymmetricKey::from_bytes(vec![1; 32]);
            let _ = token.resource_decoded();
            let _ = token.is_expired(Timestamp::from_unix_seconds(now));
            let _ = token.audience_matches(&target);
            let _ = token.verify(Timestamp::from_unix_seconds(now), &target, &[&key, &key]);
        } else {
            prop_assert_eq!(SasToken::parse(&s).unwrap_err().code, ErrorCode::MalformedToken);
        }
    }

    #[test]
    fn symmetric_key_parse_never_panics(s in arb_text()) {
        match SymmetricKey::parse(&s) {
            Ok(k) => prop_assert!((16..=64).contains(&k.as_bytes().len())),
            Err(e) => prop_assert_eq!(e.code, ErrorCode::InvalidEnrollment),
        }
    }

    #[test]
    fn parse_route_never_panics(method in method(), target in arb_text()) {
        let _ = parse_route(&method, &target);
    }

    #[test]
    fn mqtt_parsers_never_panic(s in arb_text()) {
        let _ = parse_username(&s);
        let _ = parse_request_topic(&s);
        let _ = parse_response_topic(&s);
    }

    #[test]
    fn id_parsers_never_panic(s in arb_text()) {
        let _ = RegistrationId::parse(&s);
        let _ = EnrollmentGroupId::parse(&s);
        let _ = IdScope::parse(&s);
        let _ = OperationId::parse(&s);
        let _ = DeviceId::parse(&s);
        let _ = Etag::parse(&s);
        let _ = IfMatch::parse(&s);
        if let Ok(v) = ApiVersion::parse(&s) {
            let _ = (v.date(), v.is_legacy(), v.reports_reprovisioned_substatus());
        }
    }
}
