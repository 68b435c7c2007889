//! The one error-code table of the project.
//!
//! Every rejection the service can produce has a stable six-digit code. Where Azure DPS is known to use a
//! code (spec §1.8: 400000, 400207-400209, 401000, 401002, 404201, 404202, 409203) we use the same code with
//! the same meaning; the others are ours, chosen so that `code / 1000` is always the HTTP status, which
//! the Azure C# AMQP transport and the embedded C SDK rely on.
//!
//! The table is written once, in [`error_codes!`], and generates the enum, [`ErrorCode::code`],
//! [`ErrorCode::http_status`], [`ErrorCode::message`], [`ErrorCode::is_retryable`] and
//! [`ErrorCode::from_code`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $code:literal, $retry:literal, $msg:literal; )*) => {
        /// A stable DPS error code (Azure's six-digit `errorCode`; `code / 1000` is the HTTP status).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
        }

        impl ErrorCode {
            /// Every code in the table, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The six-digit numeric code sent as `errorCode`.
            pub const fn code(self) -> u32 {
                match self { $(ErrorCode::$name => $code,)* }
            }

            /// The default human-readable message for this code.
            pub const fn message(self) -> &'static str {
                match self { $(ErrorCode::$name => $msg,)* }
            }

            /// Whether a client should retry the same request later (throttling, transient failures).
            pub const fn is_retryable(self) -> bool {
                match self { $(ErrorCode::$name => $retry,)* }
            }

            /// The stable symbolic name (e.g. `"Unauthorized"`), used by bindings and logs.
            pub const fn name(self) -> &'static str {
                match self { $(ErrorCode::$name => stringify!($name),)* }
            }

            /// Looks a numeric code up in the table.
            pub fn from_code(code: u32) -> Option<ErrorCode> {
                match code { $($code => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// Generic malformed request (Azure's 400000).
    BadRequest = 400000, false, "The request is invalid.";
    /// The body is not valid JSON or does not have the expected shape.
    InvalidJson = 400001, false, "The request body is not valid JSON for this operation.";
    /// A registration ID, group ID, device ID, operation ID or ID scope breaks the identifier rules.
    InvalidIdentifier = 400002, false, "An identifier in the request is not valid.";
    /// The registration ID in the body differs from the one in the path or MQTT username.
    RegistrationIdMismatch = 400003, false, "The registration ID in the body does not match the one in the request address.";
    /// An enrollment or enrollment group failed validation on write.
    InvalidEnrollment = 400004, false, "The enrollment is not valid.";
    /// A bulk operation with no items or more than ten.
    BulkOperationTooLarge = 400005, false, "A bulk operation must contain between 1 and 10 items.";
    /// A query specification that this service cannot run.
    InvalidQuery = 400006, false, "The query is not valid.";
    /// The request names an unknown api-version shape, or a feature the api-version does not support.
    InvalidApiVersion = 400007, false, "The api-version is missing or not valid.";
    /// A certificate signing request (`csr`) that cannot be used: not base64 DER PKCS#10, a bad signature,
    /// a subject CN other than the registration ID, an unsupported key, over size, or sent where no
    /// issuance is possible.
    InvalidCsr = 400008, false, "The certificate signing request is not valid.";
    /// A CA certificate upload or proof of possession that cannot be accepted (not a CA certificate,
    /// garbage, wrong verification code, not signed by the CA).
    InvalidCaCertificate = 400009, false, "The CA certificate or its proof of possession is not valid.";
    /// Custom allocation webhook failed (Azure's 400207).
    CustomAllocationFailed = 400207, false, "Custom allocation failed.";
    /// Custom allocation webhook did not name a hub (Azure's 400208).
    CustomAllocationIotHubNotSpecified = 400208, false, "Custom allocation did not specify an IoT hub.";
    /// Custom allocation webhook answered 401 (Azure's 400209).
    CustomAllocationUnauthorizedAccess = 400209, false, "Custom allocation webhook refused access.";
    /// No suitable linked IoT hub for the enrollment (none linked, or static policy without exactly one hub).
    NoHubAvailable = 400210, false, "No linked IoT hub is available for this enrollment.";
    /// Wrong key, unknown device or audience mismatch (Azure's 401000).
    Unauthorized = 401000, false, "Unauthorized.";
    /// The SAS token is past its expiry (plus five minutes of clock skew).
    TokenExpired = 401001, false, "The SAS token has expired.";
    /// Certificate authentication failed (Azure's 401002).
    InvalidCertificate = 401002, false, "Invalid certificate.";
    /// The ID scope is not served by this instance.
    IdScopeNotFound = 401003, false, "The ID scope is not served by this provisioning service.";
    /// The Authorization header or MQTT password is missing or not a SAS token.
    MalformedToken = 401004, false, "The authorization is missing or is not a valid SharedAccessSignature.";
    /// The shared access policy is valid but lacks the right this operation needs.
    InsufficientRights = 403001, false, "The shared access policy does not grant the right this operation needs.";
    /// An instance limit is reached (e.g. 100 symmetric-key enrollment groups, spec §10.1); the code is IoT
    /// Hub's `IotHubQuotaExceeded` (403002), as DPS documents none of its own.
    QuotaExceeded = 403002, false, "A limit of this provisioning service instance is reached.";
    /// Unknown route.
    NotFound = 404000, false, "The requested resource does not exist.";
    /// Individual enrollment not found (Azure's 404201).
    EnrollmentNotFound = 404201, false, "The enrollment does not exist.";
    /// Enrollment group not found (Azure's 404202).
    EnrollmentGroupNotFound = 404202, false, "The enrollment group does not exist.";
    /// Uploaded CA certificate not found.
    CertificateNotFound = 404205, false, "The CA certificate does not exist.";
    /// Device registration record not found.
    RegistrationNotFound = 404203, false, "The device registration does not exist.";
    /// Registration operation not found (unknown or superseded operation ID).
    OperationNotFound = 404204, false, "The registration operation does not exist.";
    /// Method not allowed on this route.
    MethodNotAllowed = 405000, false, "The method is not allowed on this resource.";
    /// The resource already exists (create-only operations).
    Conflict = 409000, false, "The resource already exists.";
    /// Concurrent registrations of the same device (Azure's 409203).
    RegistrationConflict = 409203, true, "Precondition failed: another registration of this device is in progress.";
    /// If-Match did not match the resource's current ETag.
    PreconditionFailed = 412001, false, "The ETag in If-Match does not match the resource.";
    /// The request body exceeds the 96 KB message limit.
    PayloadTooLarge = 413001, false, "The request body exceeds the 96 KB limit.";
    /// Too many requests; retry after the given delay.
    Throttled = 429001, true, "Too many requests; retry later.";
    /// Unexpected internal failure.
    InternalError = 500000, true, "An internal error occurred.";
    /// The storage backend failed.
    StoreUnavailable = 500001, true, "The storage backend is unavailable.";
    /// An IoT hub operation failed (hub unreachable or refused the device identity).
    HubOperationFailed = 500002, true, "An error occurred while sending the request to the IoT hub.";
    /// The service is temporarily unavailable (fault injection's 503; DPS documents no 503 code of its own).
    ServiceUnavailable = 503000, true, "The service is temporarily unavailable; retry later.";
}

impl ErrorCode {
    /// The HTTP status for this code: `code / 1000`.
    pub const fn http_status(self) -> u16 {
        (self.code() / 1000) as u16
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

/// A rejection: a code plus the specific message that explains it.
///
/// This is the error value every layer passes upwards; transports turn it into an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DpsError {
    /// The stable code.
    pub code: ErrorCode,
    /// A message specific to this occurrence (defaults to the table's message).
    pub message: String,
    /// Seconds the client should wait before retrying (429 and transient errors).
    pub retry_after: Option<u32>,
}

impl DpsError {
    /// An error with the table's default message.
    pub fn new(code: ErrorCode) -> Self {
        DpsError { code, message: code.message().to_owned(), retry_after: None }
    }

    /// An error with a specific message.
    pub fn with_message(code: ErrorCode, message: impl Into<String>) -> Self {
        DpsError { code, message: message.into(), retry_after: None }
    }

    /// Sets the Retry-After hint.
    #[must_use]
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The wire body for this error.
    pub fn to_body(&self, tracking_id: &str, timestamp_utc: &str) -> ErrorBody {
        ErrorBody {
            error_code: self.code.code(),
            tracking_id: tracking_id.to_owned(),
            message: self.message.clone(),
            timestamp_utc: timestamp_utc.to_owned(),
            info: None,
        }
    }
}

impl From<ErrorCode> for DpsError {
    fn from(code: ErrorCode) -> Self {
        DpsError::new(code)
    }
}

/// The wire error body (`ProvisioningServiceErrorDetails`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Six-digit error code.
    pub error_code: u32,
    /// Correlation ID, equal to the `x-ms-request-id` response header.
    pub tracking_id: String,
    /// Human-readable message.
    pub message: String,
    /// ISO-8601 UTC time of the error.
    pub timestamp_utc: String,
    /// Optional extra key/value information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_over_thousand_is_http_status() {
        for code in ErrorCode::ALL {
            assert_eq!(u32::from(code.http_status()), code.code() / 1000, "{code}");
            assert!((400..600).contains(&code.http_status()), "{code}");
            assert_eq!(ErrorCode::from_code(code.code()), Some(*code));
            assert!(!code.message().is_empty());
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.code()), "duplicate {code}");
        }
    }

    #[test]
    fn azure_codes_keep_azure_meaning() {
        assert_eq!(ErrorCode::BadRequest.code(), 400000);
        assert_eq!(ErrorCode::CustomAllocationFailed.code(), 400207);
        assert_eq!(ErrorCode::CustomAllocationIotHubNotSpecified.code(), 400208);
        assert_eq!(ErrorCode::CustomAllocationUnauthorizedAccess.code(), 400209);
        assert_eq!(ErrorCode::Unauthorized.code(), 401000);
        assert_eq!(ErrorCode::InvalidCertificate.code(), 401002);
        assert_eq!(ErrorCode::EnrollmentNotFound.code(), 404201);
        assert_eq!(ErrorCode::EnrollmentGroupNotFound.code(), 404202);
        assert_eq!(ErrorCode::RegistrationConflict.code(), 409203);
        assert_eq!(ErrorCode::PreconditionFailed.http_status(), 412);
        assert_eq!(ErrorCode::Throttled.http_status(), 429);
        assert!(ErrorCode::Throttled.is_retryable());
        assert!(!ErrorCode::Unauthorized.is_retryable());
    }

    #[test]
    fn error_body_wire_names() {
        let body = DpsError::with_message(ErrorCode::Unauthorized, "bad key")
            .to_body("f40da7ba-8c91-4796-8fc3-89e1dfbdbe05", "2019-03-15T19:43:02.7904455Z");
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"errorCode":401000,"trackingId":"f40da7ba-8c91-4796-8fc3-89e1dfbdbe05",
                "message":"bad key","timestampUtc":"2019-03-15T19:43:02.7904455Z"})
        );
    }
}
