//! Transport-agnostic replies: an HTTP-style status, a JSON body and the headers every transport needs.
//! HTTPS writes them as they are; MQTT puts `status` and `retry_after` in the response topic.

use dps_policy::MeterEvent;
use dps_proto::{DpsError, ErrorCode, Timestamp};
use serde::Serialize;

/// A reply to a device or service request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status (also the MQTT response topic's status).
    pub status: u16,
    /// JSON body (empty for 204).
    pub body: Vec<u8>,
    /// Retry-After in seconds (202 and 429 answers), always within 1..=300.
    pub retry_after: Option<u32>,
    /// The error code when this is an error reply (for `x-ms-error-code`).
    pub error_code: Option<ErrorCode>,
    /// The tracking ID (`x-ms-request-id`); equal to the error body's `trackingId`.
    pub tracking_id: String,
    /// Extra headers (`x-ms-item-type`, `x-ms-continuation`, `x-ms-max-item-count`, `etag`).
    pub headers: Vec<(&'static str, String)>,
    /// The billable operation this reply completed, if any (spec §10.3).
    pub meter: Option<MeterEvent>,
    /// The transport must close the connection without sending this reply (fault injection's dropped
    /// connection): HTTPS closes the connection with no response, MQTT closes the session, AMQP detaches.
    /// A transport that cannot drop sends the reply itself (a `503`).
    pub drop_connection: bool,
}

impl Reply {
    /// A JSON reply.
    pub fn json<T: Serialize>(status: u16, body: &T, tracking_id: String) -> Reply {
        match serde_json::to_vec(body) {
            Ok(body) => Reply {
                status,
                body,
                retry_after: None,
                error_code: None,
                tracking_id,
                headers: Vec::new(),
                meter: None,
                drop_connection: false,
            },
            Err(e) => Reply::error_plain(&DpsError::with_message(
                ErrorCode::InternalError,
                format!("could not serialize the reply: {e}"),
            )),
        }
    }

    /// An empty reply (e.g. 204).
    pub fn empty(status: u16, tracking_id: String) -> Reply {
        Reply {
            status,
            body: Vec::new(),
            retry_after: None,
            error_code: None,
            tracking_id,
            headers: Vec::new(),
            meter: None,
            drop_connection: false,
        }
    }

    /// An error reply with the wire error body.
    pub fn error(err: &DpsError, tracking_id: String, now: Timestamp) -> Reply {
        let body = err.to_body(&tracking_id, &now.to_iso());
        let body = serde_json::to_vec(&body).unwrap_or_default();
        Reply {
            status: err.code.http_status(),
            body,
            retry_after: err.retry_after.map(clamp_retry_after),
            error_code: Some(err.code),
            tracking_id,
            headers: Vec::new(),
            meter: None,
            drop_connection: false,
        }
    }

    /// An error reply when no tracking ID or time is at hand.
    pub fn error_plain(err: &DpsError) -> Reply {
        Reply::error(err, String::from("00000000-0000-0000-0000-000000000000"), Timestamp::default())
    }

    /// Sets Retry-After (clamped to 1..=300).
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u32) -> Reply {
        self.retry_after = Some(clamp_retry_after(seconds));
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Parses the body as JSON.
    pub fn body_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Clamps a Retry-After value to what every SDK accepts (1..=300 s; spec §1.7).
pub fn clamp_retry_after(seconds: u32) -> u32 {
    seconds.clamp(1, 300)
}
