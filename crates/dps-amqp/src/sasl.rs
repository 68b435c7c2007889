//! The SASL layer (spec §3.1): PLAIN with the SAS token, EXTERNAL/ANONYMOUS for certificate devices.
//!
//! The frames, their codec and the header exchange are `fe2o3-amqp`'s (`Transport<_, sasl::Frame>`); the
//! exchange itself is run here rather than through its `SaslAcceptor` trait, whose callbacks are
//! synchronous: a PLAIN password is a SAS token that only the engine can check (an async handler call),
//! and the `TPM` mechanism of spec §3.4 needs the engine between its challenges (the activation blob).
//! TPM goes in [`negotiate`]'s mechanism dispatch once the engine attests TPM devices.

use crate::address::{normalize_address, shown};
use crate::io::Io;
use crate::{AmqpError, DeviceHandler};
use dps_core::proto::{Credential, IdScope, RegistrationId};
use dps_core::{DeviceCall, DeviceRequest};
use fe2o3_amqp::frames::sasl;
use fe2o3_amqp::transport::protocol_header::ProtocolHeaderCodec;
use fe2o3_amqp::transport::Transport;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Who the SASL layer authenticated.
#[derive(Debug, Clone)]
pub(crate) enum Identity {
    /// SASL PLAIN: the device named by the authentication ID, with its SAS token (verified at SASL and
    /// again with every request, as the token may expire meanwhile).
    Sas {
        /// The ID scope of the authentication ID.
        id_scope: IdScope,
        /// The registration ID of the authentication ID.
        registration_id: RegistrationId,
        /// The SAS token (the PLAIN password).
        token: String,
    },
    /// No SASL, or EXTERNAL / ANONYMOUS: the links name the device, the TLS client certificate (if any)
    /// is its credential.
    Transport,
}

/// Runs the SASL exchange on `io`, whose unread bytes start with the client's SASL header. Returns the
/// stream (positioned after the outcome, with anything the client sent after it still unread) and the
/// identity; a refusal sends its outcome first.
pub(crate) async fn negotiate<S, H>(
    io: Io<S>,
    handler: &H,
    has_certificate: bool,
) -> Result<(Io<S>, Identity), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: DeviceHandler,
{
    let (reader, writer) = tokio::io::split(io);
    let framed_write = FramedWrite::new(writer, ProtocolHeaderCodec::new());
    let framed_read = FramedRead::new(reader, ProtocolHeaderCodec::new());
    let mut transport = Transport::<_, sasl::Frame>::negotiate_sasl_header(framed_write, framed_read)
        .await
        .map_err(|e| AmqpError::Sasl(format!("SASL header exchange: {e}")))?;

    let mut mechanisms = vec![Symbol::from("PLAIN")];
    if has_certificate {
        mechanisms.push(Symbol::from("EXTERNAL"));
        mechanisms.push(Symbol::from("ANONYMOUS"));
    }
    let offer = SaslMechanisms { sasl_server_mechanisms: Array::from(mechanisms) };
    transport.send(sasl::Frame::Mechanisms(offer)).await.map_err(sasl_io)?;

    let init = match transport.next().await {
        Some(Ok(sasl::Frame::Init(init))) => init,
        Some(Ok(other)) => {
            let reason = format!("expected sasl-init, got {}", frame_name(&other));
            let _ = transport.send(outcome(SaslCode::Sys)).await;
            return Err(AmqpError::Sasl(reason));
        }
        Some(Err(e)) => {
            let _ = transport.send(outcome(SaslCode::Sys)).await;
            return Err(AmqpError::Sasl(format!("malformed SASL frame: {e}")));
        }
        None => {
            return Err(AmqpError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection ended before sasl-init",
            )))
        }
    };

    let verdict = decide(init, handler, has_certificate).await;
    match verdict {
        Ok(identity) => {
            transport.send(outcome(SaslCode::Ok)).await.map_err(sasl_io)?;
            let (framed_write, framed_read) = transport.into_framed_codec();
            let writer = framed_write.into_inner();
            let parts = framed_read.into_parts();
            let mut io = parts.io.unsplit(writer);
            io.unread(&parts.read_buf);
            Ok((io, identity))
        }
        Err((code, reason)) => {
            let _ = transport.send(outcome(code.clone())).await;
            Err(AmqpError::SaslRefused { code: code_number(&code), reason })
        }
    }
}

/// The identity a sasl-init establishes, or the outcome code that refuses it and why.
async fn decide<H: DeviceHandler>(
    init: SaslInit,
    handler: &H,
    has_certificate: bool,
) -> Result<Identity, (SaslCode, String)> {
    match init.mechanism.0.as_str() {
        "PLAIN" => plain(init, handler).await,
        "EXTERNAL" | "ANONYMOUS" if has_certificate => Ok(Identity::Transport),
        "EXTERNAL" | "ANONYMOUS" => Err((
            SaslCode::Auth,
            format!("SASL {} needs a TLS client certificate, and none was presented", init.mechanism.0),
        )),
        // The place of the TPM mechanism (spec §3.4), once the engine attests TPM devices.
        other => Err((SaslCode::Auth, format!("SASL mechanism '{}' is not supported", shown(other)))),
    }
}

/// SASL PLAIN: `authzid \0 authcid \0 password`, the authcid `{idScope}/registrations/{registrationId}`, the
/// password the SAS token, checked with the handler.
async fn plain<H: DeviceHandler>(init: SaslInit, handler: &H) -> Result<Identity, (SaslCode, String)> {
    let auth = |m: String| (SaslCode::Auth, m);
    let response = init.initial_response.map(|b| b.into_vec()).unwrap_or_default();
    let mut parts = response.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(auth("the PLAIN response is not 'authzid NUL authcid NUL password'".to_owned()));
    };
    let authcid =
        std::str::from_utf8(authcid).map_err(|_| auth("the PLAIN authcid is not UTF-8".to_owned()))?;
    let address = normalize_address(authcid).map_err(|e| {
        auth(format!(
            "the PLAIN authcid must be '{{idScope}}/registrations/{{registrationId}}': {}",
            e.message
        ))
    })?;
    let token = std::str::from_utf8(password)
        .ok()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| auth("the PLAIN password (the SAS token) is empty or not UTF-8".to_owned()))?
        .to_owned();
    let check = DeviceRequest {
        id_scope: address.id_scope.clone(),
        registration_id: address.registration_id.clone(),
        call: DeviceCall::Authenticate,
        api_version: None,
        credential: Credential::from_transport(Some(token.clone()), None),
        body: Vec::new(),
        client_address: None,
    };
    let verdict = handler.handle(check).await;
    if verdict.status < 300 {
        return Ok(Identity::Sas {
            id_scope: address.id_scope,
            registration_id: address.registration_id,
            token,
        });
    }
    let code = match verdict.status {
        400..=499 if verdict.status != 429 => SaslCode::Auth,
        _ => SaslCode::SysTemp,
    };
    Err((code, format!("{} {}", verdict.status, String::from_utf8_lossy(&verdict.body))))
}

fn outcome(code: SaslCode) -> sasl::Frame {
    sasl::Frame::Outcome(SaslOutcome { code, additional_data: None })
}

fn code_number(code: &SaslCode) -> u8 {
    match code {
        SaslCode::Ok => 0,
        SaslCode::Auth => 1,
        SaslCode::Sys => 2,
        SaslCode::SysPerm => 3,
        SaslCode::SysTemp => 4,
    }
}

fn frame_name(frame: &sasl::Frame) -> &'static str {
    match frame {
        sasl::Frame::Mechanisms(_) => "sasl-mechanisms",
        sasl::Frame::Init(_) => "sasl-init",
        sasl::Frame::Challenge(_) => "sasl-challenge",
        sasl::Frame::Response(_) => "sasl-response",
        sasl::Frame::Outcome(_) => "sasl-outcome",
    }
}

fn sasl_io(e: impl std::fmt::Display) -> AmqpError {
    AmqpError::Sasl(format!("writing a SASL frame: {e}"))
}
