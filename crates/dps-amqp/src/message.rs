//! Request and response messages (spec §3.3): what a device's message asks for, the response message,
//! and the rejected outcome of an error.

use dps_core::proto::OperationId;
use dps_core::{DeviceCall, DpsError, ErrorCode, Reply};
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorFrame, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Data, Message, MessageId, Properties};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};

/// The application property naming the operation (`iotdps-register`, `iotdps-get-operationstatus`,
/// `iotdps-get-registration`).
pub const OPERATION_TYPE: &str = "iotdps-operation-type";
/// The application property carrying the operation ID of a status request.
pub const OPERATION_ID: &str = "iotdps-operation-id";
/// The application property the C# SDK adds to a register (`false`, a boolean).
const FORCE_REGISTRATION: &str = "iotdps-forceRegistration";

/// A device's request message, parsed.
#[derive(Debug, Clone)]
pub struct AmqpRequest {
    /// What the device asks for.
    pub call: DeviceCall,
    /// The register or status-lookup body (empty for operation-status requests, whose body is ignored).
    pub body: Vec<u8>,
    /// The request's correlation-id, echoed on its response.
    pub correlation_id: Option<MessageId>,
}

/// Reads a request from a device's message: its operation type and ID from the application properties,
/// its body from any body type (one or more `data` sections, concatenated; an `amqp-value` binary or
/// string; nothing).
///
/// Errors: `400000` when the operation type is missing or unknown, `400002` when a status request's
/// operation ID is missing or not valid.
pub fn parse_request(message: &Message<Body<Value>>) -> Result<AmqpRequest, DpsError> {
    let property = |name: &str| message.application_properties.as_ref().and_then(|p| p.0.get(name));
    let operation = match property(OPERATION_TYPE) {
        Some(SimpleValue::String(s)) => s.as_str(),
        Some(SimpleValue::Symbol(s)) => s.0.as_str(),
        Some(_) => {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the application property '{OPERATION_TYPE}' must be a string"),
            ))
        }
        None => {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the message has no application property '{OPERATION_TYPE}'"),
            ))
        }
    };
    let correlation_id = message.properties.as_ref().and_then(|p| p.correlation_id.clone());
    let call = match operation {
        "iotdps-register" => {
            let force = matches!(property(FORCE_REGISTRATION), Some(SimpleValue::Bool(true)))
                || matches!(property(FORCE_REGISTRATION), Some(SimpleValue::String(s)) if s.eq_ignore_ascii_case("true"));
            DeviceCall::Register { force }
        }
        "iotdps-get-registration" => DeviceCall::StatusLookup,
        "iotdps-get-operationstatus" => {
            let id = match property(OPERATION_ID) {
                Some(SimpleValue::String(s)) => s.as_str(),
                Some(SimpleValue::Symbol(s)) => s.0.as_str(),
                _ => {
                    return Err(DpsError::with_message(
                        ErrorCode::InvalidIdentifier,
                        format!(
                        "an operation-status request needs the string application property '{OPERATION_ID}'"
                    ),
                    ))
                }
            };
            // The body of a status request is ignored: C sends the register JSON, C# an amqp-value string.
            return Ok(AmqpRequest {
                call: DeviceCall::OperationStatus(OperationId::parse(id)?),
                body: Vec::new(),
                correlation_id,
            });
        }
        other => {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("unknown {OPERATION_TYPE} '{}'", crate::address::shown(other)),
            ))
        }
    };
    Ok(AmqpRequest { call, body: body_bytes(&message.body), correlation_id })
}

/// The bytes of a register or status-lookup body.
fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(sections) => {
            let mut out = Vec::new();
            for Data(bytes) in sections.iter() {
                out.extend_from_slice(bytes);
            }
            out
        }
        Body::Value(value) => match &value.0 {
            Value::Binary(bytes) => bytes.to_vec(),
            // A JSON document sent as a string; anything else (the C# SDK's operation name) is no body.
            Value::String(s) if s.trim_start().starts_with('{') => s.as_bytes().to_vec(),
            _ => Vec::new(),
        },
        Body::Sequence(_) | Body::Empty => Vec::new(),
    }
}

/// The response message to a successful request: one `data` section with the JSON, the request's
/// correlation-id, and `retry-after` and `Retry-After` (the C/Node and C# spellings) when the reply has one.
pub(crate) fn response_message(reply: Reply, correlation_id: Option<MessageId>) -> Message<Data> {
    let mut builder = Message::builder();
    if let Some(retry_after) = reply.retry_after {
        let seconds = i32::try_from(retry_after).unwrap_or(i32::MAX);
        builder = builder.application_properties(
            ApplicationProperties::builder()
                .insert("retry-after", SimpleValue::Int(seconds))
                .insert("Retry-After", SimpleValue::Int(seconds))
                .build(),
        );
    }
    builder = builder.properties(Properties {
        correlation_id,
        content_type: Some(Symbol::from("application/json")),
        content_encoding: Some(Symbol::from("utf-8")),
        ..Properties::default()
    });
    builder.data(Binary::from(reply.body)).build()
}

/// The error of the rejected outcome for an error reply: a condition by status, the JSON error body as
/// description, and `Retry-After` in the info when the reply has one (the C# SDK reads it there).
pub(crate) fn rejection(reply: &Reply) -> AmqpErrorFrame {
    let condition = match reply.status {
        401 | 403 => AmqpError::UnauthorizedAccess,
        404 => AmqpError::NotFound,
        409 | 412 => AmqpError::PreconditionFailed,
        413 | 429 => AmqpError::ResourceLimitExceeded,
        500.. => AmqpError::InternalError,
        _ => AmqpError::InvalidField,
    };
    let info = reply.retry_after.map(|seconds| {
        let mut fields = Fields::new();
        fields.insert(Symbol::from("Retry-After"), Value::Int(i32::try_from(seconds).unwrap_or(i32::MAX)));
        Box::new(fields)
    });
    AmqpErrorFrame {
        condition: ErrorCondition::AmqpError(condition),
        description: Some(String::from_utf8_lossy(&reply.body).into_owned()),
        info,
    }
}

/// A link-level refusal carrying a DPS error: the condition and the JSON error body as description.
pub(crate) fn link_refusal(reply: &Reply) -> AmqpErrorFrame {
    rejection(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::AmqpValue;

    fn request(
        props: &[(&str, SimpleValue)],
        body: Body<Value>,
        correlation: Option<&str>,
    ) -> Message<Body<Value>> {
        let mut builder = ApplicationProperties::builder();
        for (k, v) in props {
            builder = builder.insert(*k, v.clone());
        }
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                correlation_id: correlation.map(|c| MessageId::String(c.to_owned())),
                ..Properties::default()
            }),
            application_properties: Some(builder.build()),
            body,
            footer: None,
        }
    }

    fn op(name: &str) -> (&'static str, SimpleValue) {
        (OPERATION_TYPE, SimpleValue::String(name.to_owned()))
    }

    fn data(bytes: &[u8]) -> Body<Value> {
        Body::Data(vec![Data(Binary::from(bytes.to_vec()))].into())
    }

    #[test]
    fn register_with_any_body_type() {
        let json = br#"{"registrationId":"dev-1"}"#;
        let r = parse_request(&request(&[op("iotdps-register")], data(json), Some("c-1"))).unwrap();
        assert!(matches!(r.call, DeviceCall::Register { force: false }));
        assert_eq!(r.body, json);
        assert_eq!(r.correlation_id, Some(MessageId::String("c-1".into())));
        // Two data sections are one body.
        let two = Body::Data(
            vec![Data(Binary::from(b"{\"a\":".to_vec())), Data(Binary::from(b"1}".to_vec()))].into(),
        );
        assert_eq!(parse_request(&request(&[op("iotdps-register")], two, None)).unwrap().body, b"{\"a\":1}");
        // Empty data (C#), no body, an amqp-value string or binary.
        assert!(parse_request(&request(&[op("iotdps-register")], data(b""), None)).unwrap().body.is_empty());
        assert!(parse_request(&request(&[op("iotdps-register")], Body::Empty, None))
            .unwrap()
            .body
            .is_empty());
        let v = Body::Value(AmqpValue(Value::String("{\"registrationId\":\"d\"}".into())));
        assert_eq!(
            parse_request(&request(&[op("iotdps-register")], v, None)).unwrap().body,
            b"{\"registrationId\":\"d\"}"
        );
        let v = Body::Value(AmqpValue(Value::String("iotdps-register".into())));
        assert!(parse_request(&request(&[op("iotdps-register")], v, None)).unwrap().body.is_empty());
        // The C# SDK's force flag.
        let forced = [op("iotdps-register"), (FORCE_REGISTRATION, SimpleValue::Bool(true))];
        assert!(matches!(
            parse_request(&request(&forced, Body::Empty, None)).unwrap().call,
            DeviceCall::Register { force: true }
        ));
    }

    #[test]
    fn status_requests_ignore_their_body() {
        let props =
            [op("iotdps-get-operationstatus"), (OPERATION_ID, SimpleValue::String("4.abc.def".into()))];
        let v = Body::Value(AmqpValue(Value::String("iotdps-get-operationstatus".into())));
        let r = parse_request(&request(&props, v, None)).unwrap();
        assert!(matches!(&r.call, DeviceCall::OperationStatus(id) if id.as_str() == "4.abc.def"));
        assert!(r.body.is_empty());
        let r = parse_request(&request(&[op("iotdps-get-registration")], data(b"{}"), None)).unwrap();
        assert!(matches!(r.call, DeviceCall::StatusLookup));
    }

    #[test]
    fn bad_requests_have_stable_codes() {
        let code = |m: Message<Body<Value>>| parse_request(&m).unwrap_err().code;
        assert_eq!(code(request(&[], Body::Empty, None)), ErrorCode::BadRequest);
        assert_eq!(code(request(&[op("iotdps-delete")], Body::Empty, None)), ErrorCode::BadRequest);
        assert_eq!(
            code(request(&[(OPERATION_TYPE, SimpleValue::Int(1))], Body::Empty, None)),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(request(&[op("iotdps-get-operationstatus")], Body::Empty, None)),
            ErrorCode::InvalidIdentifier
        );
    }

    #[test]
    fn responses_carry_both_retry_after_spellings_and_the_correlation_id() {
        let mut reply = Reply::json(202, &serde_json::json!({"status": "assigning"}), "t".into());
        reply.retry_after = Some(3);
        let m = response_message(reply, Some(MessageId::String("c-9".into())));
        let props = m.application_properties.unwrap();
        assert_eq!(props.0.get("retry-after"), Some(&SimpleValue::Int(3)));
        assert_eq!(props.0.get("Retry-After"), Some(&SimpleValue::Int(3)));
        assert_eq!(m.properties.unwrap().correlation_id, Some(MessageId::String("c-9".into())));
        assert_eq!(m.body.0.to_vec(), br#"{"status":"assigning"}"#.to_vec());

        let m = response_message(Reply::json(200, &serde_json::json!({}), "t".into()), None);
        assert!(m.application_properties.is_none());
        assert!(m.properties.unwrap().correlation_id.is_none());
    }

    #[test]
    fn errors_become_rejections_with_the_json_body() {
        let mut reply = dps_host::default_error_reply(&DpsError::new(ErrorCode::Throttled));
        reply.retry_after = Some(7);
        let e = rejection(&reply);
        assert_eq!(e.condition, ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded));
        let body: serde_json::Value = serde_json::from_str(e.description.as_deref().unwrap()).unwrap();
        assert_eq!(body["errorCode"], 429001);
        assert_eq!(e.info.unwrap().get(&Symbol::from("Retry-After")), Some(&Value::Int(7)));
        let e = rejection(&dps_host::default_error_reply(&DpsError::new(ErrorCode::Unauthorized)));
        assert_eq!(e.condition, ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess));
        assert!(e.info.is_none());
    }
}
