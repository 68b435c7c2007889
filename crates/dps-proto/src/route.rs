//! HTTPS request routing: method + path + query to a [`Route`] (spec §1.3 device API, §5.2 service API).
//!
//! Literal path segments match case-insensitively (the Node service SDK sends `/enrollmentgroups/`), each
//! segment is percent-decoded once after splitting on `/`, and a trailing `/` is tolerated. Methods match
//! case-insensitively. Of the query string only `api-version` and `forceRegistration` are read (and the
//! filters of `GET /audit`); unknown parameters are ignored.

use crate::error::{DpsError, ErrorCode};
use crate::id::{ApiVersion, EnrollmentGroupId, IdScope, OperationId, RegistrationId};
use percent_encoding::percent_decode_str;
use std::borrow::Cow;

/// A recognised request, with its identifiers parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Device API: `PUT /{idScope}/registrations/{registrationId}/register`.
    Register {
        /// The ID scope from the path.
        id_scope: IdScope,
        /// The registration ID from the path.
        registration_id: RegistrationId,
    },
    /// Device API: `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    OperationStatus {
        /// The ID scope from the path.
        id_scope: IdScope,
        /// The registration ID from the path.
        registration_id: RegistrationId,
        /// The operation ID from the path.
        operation_id: OperationId,
    },
    /// Device API: `POST /{idScope}/registrations/{registrationId}` (registration status lookup).
    StatusLookup {
        /// The ID scope from the path.
        id_scope: IdScope,
        /// The registration ID from the path.
        registration_id: RegistrationId,
    },
    /// Service API: `GET /enrollments/{registrationId}`.
    GetEnrollment {
        /// The enrollment's registration ID.
        id: RegistrationId,
    },
    /// Service API: `PUT /enrollments/{registrationId}` (create or replace).
    PutEnrollment {
        /// The enrollment's registration ID.
        id: RegistrationId,
    },
    /// Service API: `DELETE /enrollments/{registrationId}`.
    DeleteEnrollment {
        /// The enrollment's registration ID.
        id: RegistrationId,
    },
    /// Service API: `POST /enrollments/{registrationId}/attestationmechanism`.
    EnrollmentAttestation {
        /// The enrollment's registration ID.
        id: RegistrationId,
    },
    /// Service API: `POST /enrollments` (bulk operation).
    BulkEnrollments,
    /// Service API: `POST /enrollments/query`.
    QueryEnrollments,
    /// Service API: `GET /enrollmentGroups/{enrollmentGroupId}`.
    GetEnrollmentGroup {
        /// The enrollment group ID.
        id: EnrollmentGroupId,
    },
    /// Service API: `PUT /enrollmentGroups/{enrollmentGroupId}` (create or replace).
    PutEnrollmentGroup {
        /// The enrollment group ID.
        id: EnrollmentGroupId,
    },
    /// Service API: `DELETE /enrollmentGroups/{enrollmentGroupId}`.
    DeleteEnrollmentGroup {
        /// The enrollment group ID.
        id: EnrollmentGroupId,
    },
    /// Service API: `POST /enrollmentGroups/{enrollmentGroupId}/attestationmechanism`.
    EnrollmentGroupAttestation {
        /// The enrollment group ID.
        id: EnrollmentGroupId,
    },
    /// Service API: `POST /enrollmentGroups` (bulk operation).
    BulkEnrollmentGroups,
    /// Service API: `POST /enrollmentGroups/query`.
    QueryEnrollmentGroups,
    /// Service API: `GET /registrations/{registrationId}` (device registration state).
    GetRegistration {
        /// The registration ID.
        id: RegistrationId,
    },
    /// Service API extension: `POST /registrations/{registrationId}/explain` (dry run of a registration).
    ExplainRegistration {
        /// The registration ID.
        id: RegistrationId,
    },
    /// Service API: `DELETE /registrations/{registrationId}`.
    DeleteRegistration {
        /// The registration ID.
        id: RegistrationId,
    },
    /// Service API: `POST /registrations/{enrollmentGroupId}/query` (registration states of a group).
    QueryRegistrations {
        /// The enrollment group whose registrations are listed.
        group_id: EnrollmentGroupId,
    },
    /// Service API: `PUT /certificates/{name}` (upload or replace a CA certificate).
    PutCertificate {
        /// The certificate name as sent.
        name: String,
    },
    /// Service API: `GET /certificates/{name}`.
    GetCertificate {
        /// The certificate name as sent.
        name: String,
    },
    /// Service API: `DELETE /certificates/{name}`.
    DeleteCertificate {
        /// The certificate name as sent.
        name: String,
    },
    /// Service API: `GET /certificates`.
    ListCertificates,
    /// Service API: `POST /certificates/{name}/generateVerificationCode`.
    GenerateVerificationCode {
        /// The certificate name as sent.
        name: String,
    },
    /// Service API: `POST /certificates/{name}/verify`.
    VerifyCertificate {
        /// The certificate name as sent.
        name: String,
    },
    /// Service API extension (not Azure's): `GET /audit?since=…&until=…&principal=…&target=…&operation=…`,
    /// the audit log, newest first. The parameters are kept as sent (percent-decoded); the engine parses
    /// them.
    QueryAudit {
        /// `since` (RFC 3339): records at or after it.
        since: Option<String>,
        /// `until` (RFC 3339): records before it.
        until: Option<String>,
        /// `principal`: records of this shared access policy or in-process principal.
        principal: Option<String>,
        /// `target`: records about this item.
        target: Option<String>,
        /// `operation`: records of this operation (e.g. `enrollment.put`).
        operation: Option<String>,
    },
}

impl Route {
    /// Whether this is a device (runtime) API route rather than a service (management) API route.
    pub fn is_device_api(&self) -> bool {
        matches!(self, Route::Register { .. } | Route::OperationStatus { .. } | Route::StatusLookup { .. })
    }
}

/// A routed request: the route plus the query parameters that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The recognised route.
    pub route: Route,
    /// The `api-version` query parameter, if present.
    pub api_version: Option<ApiVersion>,
    /// `forceRegistration=true` (case-insensitive value); false when absent or anything else.
    pub force_registration: bool,
}

/// The path shapes, before method dispatch and identifier parsing.
enum Shape<'a> {
    /// `/{scope}/registrations/{id}`
    DeviceRegistration(&'a str, &'a str),
    /// `/{scope}/registrations/{id}/register`
    DeviceRegister(&'a str, &'a str),
    /// `/{scope}/registrations/{id}/operations/{op}`
    DeviceOperation(&'a str, &'a str, &'a str),
    /// `/enrollments` or `/enrollmentGroups`
    Collection(Kind),
    /// `/enrollments/query` or `/enrollmentGroups/query` (also an item named "query" for non-POST)
    QueryOrItem(Kind),
    /// `/enrollments/{id}` or `/enrollmentGroups/{id}`
    Item(Kind, &'a str),
    /// `/enrollments/{id}/attestationmechanism` or the group equivalent
    Attestation(Kind, &'a str),
    /// `/registrations/{id}`
    Registration(&'a str),
    /// `/registrations/{groupId}/query`
    RegistrationQuery(&'a str),
    /// `/registrations/{id}/explain`
    RegistrationExplain(&'a str),
    /// `/certificates`
    Certificates,
    /// `/certificates/{name}`
    Certificate(&'a str),
    /// `/certificates/{name}/{action}` (`generateVerificationCode`, `verify`)
    CertificateAction(&'a str, &'a str),
    /// `/audit`
    Audit,
}

#[derive(Clone, Copy)]
enum Kind {
    Enrollments,
    Groups,
}

fn is(segment: &str, literal: &str) -> bool {
    segment.eq_ignore_ascii_case(literal)
}

fn shape<'a>(segs: &[&'a str]) -> Option<Shape<'a>> {
    let kind = |s: &str| {
        if is(s, "enrollments") {
            Some(Kind::Enrollments)
        } else if is(s, "enrollmentGroups") {
            Some(Kind::Groups)
        } else {
            None
        }
    };
    if let Some((first, rest)) = segs.split_first() {
        if let Some(k) = kind(first) {
            return match *rest {
                [] => Some(Shape::Collection(k)),
                [id] if is(id, "query") => Some(Shape::QueryOrItem(k)),
                [id] => Some(Shape::Item(k, id)),
                [id, att] if is(att, "attestationmechanism") => Some(Shape::Attestation(k, id)),
                _ => None,
            };
        }
    }
    match *segs {
        [first] if is(first, "certificates") => Some(Shape::Certificates),
        [first] if is(first, "audit") => Some(Shape::Audit),
        [first, name] if is(first, "certificates") => Some(Shape::Certificate(name)),
        [first, name, action] if is(first, "certificates") => Some(Shape::CertificateAction(name, action)),
        [first, id] if is(first, "registrations") => Some(Shape::Registration(id)),
        [first, id, q] if is(first, "registrations") && is(q, "query") => Some(Shape::RegistrationQuery(id)),
        [first, id, e] if is(first, "registrations") && is(e, "explain") => {
            Some(Shape::RegistrationExplain(id))
        }
        [scope, regs, id] if is(regs, "registrations") => Some(Shape::DeviceRegistration(scope, id)),
        [scope, regs, id, reg] if is(regs, "registrations") && is(reg, "register") => {
            Some(Shape::DeviceRegister(scope, id))
        }
        [scope, regs, id, ops, op] if is(regs, "registrations") && is(ops, "operations") => {
            Some(Shape::DeviceOperation(scope, id, op))
        }
        _ => None,
    }
}

fn not_found(path: &str) -> DpsError {
    let shown: String = path.chars().take(200).collect();
    DpsError::with_message(ErrorCode::NotFound, format!("no resource at '{shown}'"))
}

fn method_not_allowed(method: &str, path: &str, allowed: &str) -> DpsError {
    let m: String = method.chars().take(20).collect();
    let p: String = path.chars().take(200).collect();
    DpsError::with_message(
        ErrorCode::MethodNotAllowed,
        format!("method '{m}' is not allowed on '{p}'; allowed: {allowed}"),
    )
}

fn decode(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

/// Routes a request from its method and request target (`/path?query`).
///
/// Errors: [`ErrorCode::NotFound`] for an unknown path, [`ErrorCode::MethodNotAllowed`] for a known path with
/// another method, [`ErrorCode::InvalidIdentifier`] for a bad ID in the path, and
/// [`ErrorCode::InvalidApiVersion`] for a malformed `api-version`.
pub fn parse_route(method: &str, path_and_query: &str) -> Result<RouteMatch, DpsError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_and_query, ""),
    };
    let trimmed = path.trim_end_matches('/');
    let body = trimmed.strip_prefix('/').ok_or_else(|| not_found(path))?;
    let decoded: Vec<Cow<'_, str>> = body.split('/').map(decode).collect();
    let segs: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
    let shape = shape(&segs).ok_or_else(|| not_found(path))?;

    let m = method.to_ascii_uppercase();
    let m = m.as_str();
    let route = match shape {
        Shape::DeviceRegister(scope, id) => match m {
            "PUT" => Route::Register {
                id_scope: IdScope::parse(scope)?,
                registration_id: RegistrationId::parse(id)?,
            },
            _ => return Err(method_not_allowed(method, path, "PUT")),
        },
        Shape::DeviceOperation(scope, id, op) => match m {
            "GET" => Route::OperationStatus {
                id_scope: IdScope::parse(scope)?,
                registration_id: RegistrationId::parse(id)?,
                operation_id: OperationId::parse(op)?,
            },
            _ => return Err(method_not_allowed(method, path, "GET")),
        },
        Shape::DeviceRegistration(scope, id) => match m {
            "POST" => Route::StatusLookup {
                id_scope: IdScope::parse(scope)?,
                registration_id: RegistrationId::parse(id)?,
            },
            _ => return Err(method_not_allowed(method, path, "POST")),
        },
        Shape::Collection(kind) => match m {
            "POST" => match kind {
                Kind::Enrollments => Route::BulkEnrollments,
                Kind::Groups => Route::BulkEnrollmentGroups,
            },
            _ => return Err(method_not_allowed(method, path, "POST")),
        },
        Shape::QueryOrItem(kind) if m == "POST" => match kind {
            Kind::Enrollments => Route::QueryEnrollments,
            Kind::Groups => Route::QueryEnrollmentGroups,
        },
        Shape::QueryOrItem(kind) => item_route(kind, m, "query", method, path)?,
        Shape::Item(kind, id) => item_route(kind, m, id, method, path)?,
        Shape::Attestation(kind, id) => match (m, kind) {
            ("POST", Kind::Enrollments) => Route::EnrollmentAttestation { id: RegistrationId::parse(id)? },
            ("POST", Kind::Groups) => Route::EnrollmentGroupAttestation { id: EnrollmentGroupId::parse(id)? },
            _ => return Err(method_not_allowed(method, path, "POST")),
        },
        Shape::Registration(id) => match m {
            "GET" => Route::GetRegistration { id: RegistrationId::parse(id)? },
            "DELETE" => Route::DeleteRegistration { id: RegistrationId::parse(id)? },
            _ => return Err(method_not_allowed(method, path, "GET, DELETE")),
        },
        Shape::RegistrationExplain(id) => match m {
            "POST" => Route::ExplainRegistration { id: RegistrationId::parse(id)? },
            _ => return Err(method_not_allowed(method, path, "POST")),
        },
        Shape::RegistrationQuery(group) => match m {
            "POST" => Route::QueryRegistrations { group_id: EnrollmentGroupId::parse(group)? },
            _ => return Err(method_not_allowed(method, path, "POST")),
        },
        Shape::Certificates => match m {
            "GET" => Route::ListCertificates,
            _ => return Err(method_not_allowed(method, path, "GET")),
        },
        Shape::Certificate(name) => {
            let name = name.to_owned();
            match m {
                "GET" => Route::GetCertificate { name },
                "PUT" => Route::PutCertificate { name },
                "DELETE" => Route::DeleteCertificate { name },
                _ => return Err(method_not_allowed(method, path, "GET, PUT, DELETE")),
            }
        }
        Shape::CertificateAction(name, action) => {
            let name = name.to_owned();
            match m {
                "POST" if is(action, "generateVerificationCode") => Route::GenerateVerificationCode { name },
                "POST" if is(action, "verify") => Route::VerifyCertificate { name },
                _ if is(action, "generateVerificationCode") || is(action, "verify") => {
                    return Err(method_not_allowed(method, path, "POST"))
                }
                _ => return Err(not_found(path)),
            }
        }
        Shape::Audit => match m {
            "GET" => audit_route(query),
            _ => return Err(method_not_allowed(method, path, "GET")),
        },
    };

    let mut api_version = None;
    let mut force_registration = false;
    let mut seen_api_version = false;
    let mut seen_force = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k);
        if key.eq_ignore_ascii_case("api-version") && !seen_api_version {
            seen_api_version = true;
            api_version = Some(ApiVersion::parse(&decode(v))?);
        } else if key.eq_ignore_ascii_case("forceRegistration") && !seen_force {
            seen_force = true;
            force_registration = decode(v).eq_ignore_ascii_case("true");
        }
    }

    Ok(RouteMatch { route, api_version, force_registration })
}

/// `GET /audit` with its filter parameters (the first of each; empty values count as absent).
fn audit_route(query: &str) -> Route {
    let (mut since, mut until, mut principal, mut target, mut operation) = (None, None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match decode(k).to_ascii_lowercase().as_str() {
            "since" => &mut since,
            "until" => &mut until,
            "principal" => &mut principal,
            "target" => &mut target,
            "operation" => &mut operation,
            _ => continue,
        };
        // `+` is a space in a query string; RFC 3339 offsets are sent as `%2B`.
        let value = decode(&v.replace('+', " ")).into_owned();
        if slot.is_none() && !value.is_empty() {
            *slot = Some(value);
        }
    }
    Route::QueryAudit { since, until, principal, target, operation }
}

/// GET/PUT/DELETE on `/enrollments/{id}` or `/enrollmentGroups/{id}`.
fn item_route(kind: Kind, m: &str, id: &str, method: &str, path: &str) -> Result<Route, DpsError> {
    Ok(match (kind, m) {
        (Kind::Enrollments, "GET") => Route::GetEnrollment { id: RegistrationId::parse(id)? },
        (Kind::Enrollments, "PUT") => Route::PutEnrollment { id: RegistrationId::parse(id)? },
        (Kind::Enrollments, "DELETE") => Route::DeleteEnrollment { id: RegistrationId::parse(id)? },
        (Kind::Groups, "GET") => Route::GetEnrollmentGroup { id: EnrollmentGroupId::parse(id)? },
        (Kind::Groups, "PUT") => Route::PutEnrollmentGroup { id: EnrollmentGroupId::parse(id)? },
        (Kind::Groups, "DELETE") => Route::DeleteEnrollmentGroup { id: EnrollmentGroupId::parse(id)? },
        _ => return Err(method_not_allowed(method, path, "GET, PUT, DELETE")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_routes() {
        let q = "?api-version=2021-10-01";
        assert_eq!(route("GET", &format!("/certificates{q}")), Route::ListCertificates);
        assert_eq!(
            route("GET", "/audit?api-version=2021-10-01&target=dev%2D1&since=2024-01-01T00%3A00%3A00Z&target=x&principal="),
            Route::QueryAudit {
                since: Some("2024-01-01T00:00:00Z".into()),
                until: None,
                principal: None,
                target: Some("dev-1".into()),
                operation: None,
            }
        );
        assert_eq!(err("POST", "/audit"), ErrorCode::MethodNotAllowed);
        assert_eq!(route("GET", "/Certificates/Root-1"), Route::GetCertificate { name: "Root-1".into() });
        assert_eq!(
            route("put", &format!("/certificates/root{q}")),
            Route::PutCertificate { name: "root".into() }
        );
        assert_eq!(route("DELETE", "/certificates/root/"), Route::DeleteCertificate { name: "root".into() });
        assert_eq!(
            route("POST", &format!("/certificates/root/generateverificationcode{q}")),
            Route::GenerateVerificationCode { name: "root".into() }
        );
        assert_eq!(
            route("POST", "/certificates/root/verify"),
            Route::VerifyCertificate { name: "root".into() }
        );
        assert_eq!(err("GET", "/certificates/root/verify"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("POST", "/certificates"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("POST", "/certificates/root/other"), ErrorCode::NotFound);
    }

    const SCOPE: &str = "0ne00111111";
    const OP: &str = "5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550";

    fn route(method: &str, target: &str) -> Route {
        parse_route(method, target).unwrap_or_else(|e| panic!("{method} {target}: {e}")).route
    }

    fn err(method: &str, target: &str) -> ErrorCode {
        parse_route(method, target).unwrap_err().code
    }

    fn rid(s: &str) -> RegistrationId {
        RegistrationId::parse(s).unwrap()
    }

    fn gid(s: &str) -> EnrollmentGroupId {
        EnrollmentGroupId::parse(s).unwrap()
    }

    fn scope() -> IdScope {
        IdScope::parse(SCOPE).unwrap()
    }

    #[test]
    fn appendix_a1_request_lines() {
        let m =
            parse_route("PUT", "/0ne00111111/registrations/my-symkey-device/register?api-version=2021-06-01")
                .unwrap();
        assert_eq!(m.route, Route::Register { id_scope: scope(), registration_id: rid("my-symkey-device") });
        assert_eq!(m.api_version, Some(ApiVersion::V2021_06_01));
        assert!(!m.force_registration);
        assert!(m.route.is_device_api());

        let m = parse_route(
            "GET",
            &format!("/0ne00111111/registrations/my-symkey-device/operations/{OP}?api-version=2021-06-01"),
        )
        .unwrap();
        assert_eq!(
            m.route,
            Route::OperationStatus {
                id_scope: scope(),
                registration_id: rid("my-symkey-device"),
                operation_id: OperationId::parse(OP).unwrap(),
            }
        );
        assert_eq!(m.api_version, Some(ApiVersion::V2021_06_01));

        // Appendix A.3 (TPM): 52-char base32 registration ID and an uppercase-hex scope.
        let tpm_id = "6rek5qncnygnkzflohxz4u6zlfly6ktm4klsc7xrbgvesqyllnfa";
        let m = parse_route(
            "PUT",
            &format!("/0ne000CBD6C/registrations/{tpm_id}/register?api-version=2021-06-01"),
        )
        .unwrap();
        assert_eq!(
            m.route,
            Route::Register {
                id_scope: IdScope::parse("0ne000cbd6c").unwrap(),
                registration_id: rid(tpm_id)
            }
        );
    }

    #[test]
    fn device_routes() {
        assert_eq!(
            route("POST", "/0ne00111111/registrations/dev1?api-version=2019-03-31"),
            Route::StatusLookup { id_scope: scope(), registration_id: rid("dev1") }
        );
        assert_eq!(err("GET", "/0ne00111111/registrations/dev1"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/0ne00111111/registrations/dev1/register"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("POST", "/0ne00111111/registrations/dev1/register"), ErrorCode::MethodNotAllowed);
        assert_eq!(
            err("PUT", &format!("/0ne00111111/registrations/dev1/operations/{OP}")),
            ErrorCode::MethodNotAllowed
        );
        assert_eq!(err("PUT", "/0ne00111111/registrations/dev1/other"), ErrorCode::NotFound);
        assert_eq!(err("PUT", "/0ne00111111/registrations/dev1/operations"), ErrorCode::NotFound);
        assert_eq!(err("PUT", "/0ne00111111/devices/dev1/register"), ErrorCode::NotFound);
        // Bad identifiers in a known shape.
        assert_eq!(err("PUT", "/0ne0011111/registrations/dev1/register"), ErrorCode::InvalidIdentifier);
        assert_eq!(err("PUT", "/0ne00111111/registrations/-dev/register"), ErrorCode::InvalidIdentifier);
        assert_eq!(
            err("GET", "/0ne00111111/registrations/dev1/operations/a%2Fb"),
            ErrorCode::InvalidIdentifier
        );
        let e = parse_route("PUT", "/0ne00111111/registrations/bad%20id/register").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidIdentifier);
        assert!(e.message.contains("bad id"), "{}", e.message);
    }

    #[test]
    fn enrollment_routes() {
        let id = || rid("enr-1");
        assert_eq!(
            route("GET", "/enrollments/enr-1?api-version=2021-10-01"),
            Route::GetEnrollment { id: id() }
        );
        assert_eq!(route("PUT", "/enrollments/enr-1"), Route::PutEnrollment { id: id() });
        assert_eq!(route("DELETE", "/enrollments/enr-1"), Route::DeleteEnrollment { id: id() });
        assert_eq!(
            route("POST", "/enrollments/enr-1/attestationmechanism"),
            Route::EnrollmentAttestation { id: id() }
        );
        assert_eq!(route("POST", "/enrollments"), Route::BulkEnrollments);
        assert_eq!(route("POST", "/enrollments/query"), Route::QueryEnrollments);
        assert_eq!(route("GET", "/enrollments/query"), Route::GetEnrollment { id: rid("query") });
        assert_eq!(route("PUT", "/enrollments/QUERY"), Route::PutEnrollment { id: rid("QUERY") });
        assert_eq!(route("DELETE", "/enrollments/query"), Route::DeleteEnrollment { id: rid("query") });
        assert_eq!(
            route("POST", "/enrollments/query/attestationmechanism"),
            Route::EnrollmentAttestation { id: rid("query") }
        );
        assert_eq!(err("POST", "/enrollments/enr-1"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/enrollments"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("PATCH", "/enrollments/query"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/enrollments/enr-1/attestationmechanism"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/enrollments/enr-1/other"), ErrorCode::NotFound);
        assert_eq!(err("GET", "/enrollments/a/b/c"), ErrorCode::NotFound);
        assert!(!Route::QueryEnrollments.is_device_api());
    }

    #[test]
    fn group_routes() {
        let id = || gid("group-1");
        assert_eq!(route("GET", "/enrollmentGroups/group-1"), Route::GetEnrollmentGroup { id: id() });
        assert_eq!(route("PUT", "/enrollmentGroups/group-1"), Route::PutEnrollmentGroup { id: id() });
        assert_eq!(route("DELETE", "/enrollmentGroups/group-1"), Route::DeleteEnrollmentGroup { id: id() });
        assert_eq!(
            route("POST", "/enrollmentgroups/group-1/attestationmechanism?api-version=2021-10-01"),
            Route::EnrollmentGroupAttestation { id: id() }
        );
        assert_eq!(route("POST", "/enrollmentGroups"), Route::BulkEnrollmentGroups);
        assert_eq!(route("POST", "/enrollmentGroups/query"), Route::QueryEnrollmentGroups);
        assert_eq!(route("GET", "/enrollmentGroups/query"), Route::GetEnrollmentGroup { id: gid("query") });
        assert_eq!(err("POST", "/enrollmentGroups/group-1"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("PUT", "/enrollmentGroups"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/enrollmentGroups/bad_"), ErrorCode::InvalidIdentifier);
    }

    #[test]
    fn registration_routes() {
        assert_eq!(route("GET", "/registrations/dev1"), Route::GetRegistration { id: rid("dev1") });
        assert_eq!(route("DELETE", "/registrations/dev1"), Route::DeleteRegistration { id: rid("dev1") });
        assert_eq!(
            route("POST", "/registrations/group-1/query"),
            Route::QueryRegistrations { group_id: gid("group-1") }
        );
        assert_eq!(err("POST", "/registrations/dev1"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/registrations/group-1/query"), ErrorCode::MethodNotAllowed);
        assert_eq!(err("GET", "/registrations"), ErrorCode::NotFound);
        assert_eq!(err("GET", "/registrations/x/y"), ErrorCode::NotFound);
    }

    #[test]
    fn literal_and_method_casing() {
        assert_eq!(
            route("put", "/0NE00111111/REGISTRATIONS/Dev1/REGISTER"),
            Route::Register { id_scope: scope(), registration_id: rid("dev1") }
        );
        assert_eq!(route("Get", "/ENROLLMENTS/enr-1"), Route::GetEnrollment { id: rid("enr-1") });
        assert_eq!(route("post", "/EnrollmentGroups/Query"), Route::QueryEnrollmentGroups);
        assert_eq!(route("delete", "/Registrations/dev1"), Route::DeleteRegistration { id: rid("dev1") });
        // The ID keeps the case it was sent with.
        match route("PUT", "/0ne00111111/registrations/Dev1/register") {
            Route::Register { registration_id, id_scope } => {
                assert_eq!(registration_id.as_str(), "Dev1");
                assert_eq!(id_scope.as_str(), SCOPE);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encoded_segments_and_slashes() {
        assert_eq!(
            route("PUT", "/0ne00111111/registrations/my%2Dsymkey%2ddevice/register"),
            Route::Register { id_scope: scope(), registration_id: rid("my-symkey-device") }
        );
        assert_eq!(route("GET", "/enrollments/a%3Ab%2Ec"), Route::GetEnrollment { id: rid("a:b.c") });
        assert_eq!(route("GET", "/%65nrollments/enr-1"), Route::GetEnrollment { id: rid("enr-1") });
        // Decoded once only.
        assert_eq!(err("GET", "/enrollments/a%252Db"), ErrorCode::InvalidIdentifier);
        // An encoded slash stays inside its segment.
        assert_eq!(err("GET", "/enrollments/a%2Fb"), ErrorCode::InvalidIdentifier);
        assert_eq!(route("GET", "/enrollments/enr-1/"), Route::GetEnrollment { id: rid("enr-1") });
        assert_eq!(route("POST", "/enrollments/?api-version=2021-10-01"), Route::BulkEnrollments);
        assert_eq!(err("GET", "/enrollments//enr-1"), ErrorCode::NotFound);
        assert_eq!(err("GET", "enrollments/enr-1"), ErrorCode::NotFound);
        assert_eq!(err("GET", ""), ErrorCode::NotFound);
        assert_eq!(err("GET", "/"), ErrorCode::NotFound);
        assert_eq!(err("GET", "/?api-version=2021-10-01"), ErrorCode::NotFound);
        assert_eq!(err("GET", "/health"), ErrorCode::NotFound);
    }

    #[test]
    fn query_parameters() {
        let m = parse_route(
            "PUT",
            "/0ne00111111/registrations/d/register?api-version=2019-03-31&forceRegistration=true",
        )
        .unwrap();
        assert_eq!(m.api_version, Some(ApiVersion::V2019_03_31));
        assert!(m.force_registration);
        for (q, force) in [
            ("forceRegistration=TRUE", true),
            ("forceregistration=True", true),
            ("forceRegistration=false", false),
            ("forceRegistration=1", false),
            ("forceRegistration=", false),
            ("forceRegistration", false),
            ("forceRegistration=yes&x=1", false),
            ("a=b&forceRegistration=%74rue", true),
        ] {
            let m = parse_route("PUT", &format!("/0ne00111111/registrations/d/register?{q}")).unwrap();
            assert_eq!(m.force_registration, force, "{q}");
            assert_eq!(m.api_version, None, "{q}");
        }
        let m = parse_route("GET", "/enrollments/e?foo=bar&&api-version=2025-07-01-preview&baz").unwrap();
        assert_eq!(m.api_version, Some(ApiVersion::V2025_07_01Preview));
        let m = parse_route("GET", "/enrollments/e?API-VERSION=2026-11-02%2Dpreview").unwrap();
        assert_eq!(m.api_version.as_ref().map(ApiVersion::as_str), Some("2026-11-02-preview"));
        assert_eq!(err("GET", "/enrollments/e?api-version=latest"), ErrorCode::InvalidApiVersion);
        assert_eq!(err("GET", "/enrollments/e?api-version="), ErrorCode::InvalidApiVersion);
        // Route errors come before query errors.
        assert_eq!(err("GET", "/nothing?api-version=latest"), ErrorCode::NotFound);
    }
}
