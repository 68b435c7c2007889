//! Explain and dry-run (an extension of this service; Azure has none): for a registration ID and a device
//! (its key, its certificates, a group it would belong to, or nothing), what a registration *would* do —
//! which enrollment matches and how, which linked hubs are candidates and why the others are not, which
//! hub the allocation policy chooses and why, and what the reprovision policy does with the device's
//! current assignment — without writing anything and without calling a webhook.
//!
//! It runs the registration's own code: the same attestation ([`dps_attest::attest`]) and the same
//! planning as a register ([`crate::device`]), on the device context a register loads, so the answer
//! cannot drift from what a device would get. A device described by an enrollment rather than a
//! credential is attested with a credential made from that enrollment's key (the individual enrollment's
//! own key, or the named group's key derived for the registration ID).

use crate::config::EngineConfig;
use crate::device::{plan_assignment, Planned};
use crate::request::{DeviceCall, DeviceRequest};
use crate::store::{DeviceContext, EnrollmentRef};
use dps_attest::{Attestation, MatchedEnrollment};
use dps_policy::{candidate_hubs, effective_policy, TwinSource};
use dps_proto::allocation::ExplainRequest;
use dps_proto::credential::CertificateChain;
use dps_proto::model::{AllocationPolicy, AttestationType, EnrollmentGroup};
use dps_proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_proto::{ApiVersion, Credential, DpsError, ErrorCode, RegistrationId, Timestamp};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// An explain command waiting for its device context.
#[derive(Debug, Clone)]
pub struct ExplainJob {
    config: EngineConfig,
    now: Timestamp,
    registration_id: RegistrationId,
    request: ExplainRequest,
    client_address: Option<IpAddr>,
    api_version: ApiVersion,
}

impl ExplainJob {
    /// Checks the request's syntax (address, api-version, certificates) before anything is read.
    pub(crate) fn new(
        config: &EngineConfig,
        now: Timestamp,
        registration_id: RegistrationId,
        request: ExplainRequest,
    ) -> Result<ExplainJob, DpsError> {
        let bad = |m: String| DpsError::with_message(ErrorCode::BadRequest, m);
        let client_address = request
            .client_address
            .as_deref()
            .map(|a| {
                a.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| bad(format!("clientAddress '{a}' is not an IP address")))
            })
            .transpose()?;
        let api_version = match request.api_version.as_deref() {
            Some(v) => ApiVersion::parse(v)?,
            None => ApiVersion::V2021_10_01,
        };
        if request.certificates.is_some() && request.device_key.is_some() {
            return Err(bad("give either deviceKey or certificates, not both".into()));
        }
        Ok(ExplainJob { config: config.clone(), now, registration_id, request, client_address, api_version })
    }

    /// The registration ID explained.
    pub fn registration_id(&self) -> &str {
        self.registration_id.as_str()
    }

    fn sas(&self, key: &SymmetricKey) -> Credential {
        let sr =
            encode_resource(&device_resource(self.config.id_scope.as_str(), self.registration_id.as_str()));
        Credential::SasToken(build_token(key, &sr, self.now.unix_seconds() + 300, Some("registration")))
    }

    /// The credential to attest with, and how it was chosen; `Err`: an explanation without one.
    fn credential(&self, ctx: &DeviceContext) -> Result<(Credential, String), Value> {
        let q = &self.request;
        if let Some(certs) = &q.certificates {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let der: Result<Vec<Vec<u8>>, _> = certs.iter().map(|c| b64.decode(c.trim())).collect();
            return match der {
                Ok(der) if !der.is_empty() => Ok((
                    Credential::ClientCertificate(CertificateChain { der }),
                    format!("the given certificate chain ({} certificates)", certs.len()),
                )),
                _ => {
                    Err(json!({"error": "certificates must be a non-empty list of base64 DER certificates"}))
                }
            };
        }
        if let Some(key) = &q.device_key {
            return match SymmetricKey::parse(key) {
                Ok(k) => Ok((self.sas(&k), "the given device key".to_owned())),
                Err(e) => Err(json!({"error": format!("deviceKey: {}", e.message)})),
            };
        }
        let symmetric_primary = |att: &dps_proto::model::AttestationMechanism| {
            (att.kind == AttestationType::SymmetricKey)
                .then(|| att.symmetric_key.as_ref().and_then(|k| k.primary_key.as_deref()))
                .flatten()
                .and_then(|k| SymmetricKey::parse(k).ok())
        };
        if let Some(e) = &ctx.individual {
            return match symmetric_primary(&e.attestation) {
                Some(k) => Ok((self.sas(&k), "the individual enrollment's primary key".to_owned())),
                None => Err(json!({
                    "individualEnrollment": e.registration_id,
                    "attestationType": e.attestation.kind,
                    "explanation": "the individual enrollment with this registration ID decides (it takes precedence over \
                        every group); it does not attest with a symmetric key, so pass the device's certificates",
                })),
            };
        }
        let recorded = ctx.registration.as_ref().and_then(|r| match &r.enrollment {
            EnrollmentRef::Group(g) => Some(g.as_str().to_owned()),
            EnrollmentRef::Individual(_) => None,
        });
        let wanted = q.enrollment_group_id.clone().or(recorded);
        let Some(group_id) = wanted else {
            return Err(json!({
                "explanation": "no individual enrollment has this registration ID; a symmetric-key device is matched \
                    to the enrollment group whose derived key it presents, an X.509 device to the group of its \
                    signing certificate: pass enrollmentGroupId, deviceKey or certificates",
                "enrollmentGroups": ctx.groups.iter().map(group_summary).collect::<Vec<_>>(),
            }));
        };
        let Some(group) = ctx.groups.iter().find(|g| g.enrollment_group_id.eq_ignore_ascii_case(&group_id))
        else {
            return Err(json!({"error": format!("enrollment group '{group_id}' does not exist")}));
        };
        match symmetric_primary(&group.attestation) {
            Some(k) => Ok((
                self.sas(&k.derive_device_key(self.registration_id.as_str())),
                format!(
                    "enrollment group '{}''s key derived for the registration ID",
                    group.enrollment_group_id
                ),
            )),
            None => Err(json!({
                "enrollmentGroup": group_summary(group),
                "explanation": "this group does not attest with symmetric keys: pass the device's certificates",
            })),
        }
    }

    /// The explanation (a JSON object; see the README for its fields).
    pub(crate) fn explain(&self, mut ctx: DeviceContext) -> Value {
        let mut out = json!({"registrationId": self.registration_id.as_str(), "dryRun": true});
        if let Some(record) = &ctx.registration {
            out["currentRegistration"] = json!({
                "status": record.status, "assignedHub": record.assigned_hub, "deviceId": record.device_id,
                "substatus": record.substatus, "errorCode": record.error_code, "errorMessage": record.error_message,
                "enrollment": match &record.enrollment {
                    EnrollmentRef::Group(g) => json!({"enrollmentGroupId": g.as_str()}),
                    EnrollmentRef::Individual(_) => json!({"individualEnrollment": self.registration_id.as_str()}),
                },
            });
        }
        let (credential, how) = match self.credential(&ctx) {
            Ok(c) => c,
            Err(v) => {
                out["attestation"] = v;
                return out;
            }
        };
        out["attestation"] = json!({"credential": how});
        let attested = dps_attest::prepare(self.now, &credential).and_then(|presented| {
            dps_attest::attest(
                self.now,
                &self.config.id_scope,
                &self.registration_id,
                &presented,
                ctx.individual.take().map(Arc::new),
                &ctx.groups,
                ctx.registration.as_ref().and_then(|r| match &r.enrollment {
                    EnrollmentRef::Group(g) => Some(g.as_str()),
                    EnrollmentRef::Individual(_) => None,
                }),
                &ctx.certificates,
            )
        });
        let device = match attested {
            Err(e) => {
                out["attestation"]["result"] = json!("refused");
                out["attestation"]["errorCode"] = json!(e.code.code());
                out["attestation"]["message"] = json!(e.message);
                out["outcome"] = json!("refused");
                return out;
            }
            Ok(Attestation::Disabled(d)) => {
                out["attestation"]["result"] = json!("authenticated");
                out["enrollment"] = enrollment_summary(d.enrollment());
                out["outcome"] = json!("disabled");
                out["explanation"] = json!(
                    "the matched enrollment is disabled: the registration ends with status \
                    'disabled' and no hub is touched"
                );
                return out;
            }
            Ok(Attestation::Verified(v)) => v,
        };
        out["attestation"]["result"] = json!("authenticated");
        out["enrollment"] = enrollment_summary(device.enrollment());
        let (policy, policy_source, hubs, hub) = match device.enrollment() {
            MatchedEnrollment::Individual(e) => {
                (e.allocation_policy, e.iot_hubs.clone(), e.iot_hubs.clone(), e.iot_hub_host_name.clone())
            }
            MatchedEnrollment::Group(g) => {
                let g = g.group();
                (g.allocation_policy, g.iot_hubs.clone(), g.iot_hubs.clone(), g.iot_hub_host_name.clone())
            }
        };
        let _ = policy_source;
        let effective = policy.unwrap_or(self.config.default_allocation);
        let names_hubs =
            hubs.as_ref().is_some_and(|h| !h.is_empty()) || hub.as_ref().is_some_and(|h| !h.is_empty());
        let eligible = candidate_hubs(&self.config.linked_hubs, hubs.as_deref(), hub.as_deref());
        let latency = |h: &dps_policy::LinkedHub| {
            self.config.latency.as_ref().zip(self.client_address).and_then(|(s, ip)| s.latency_ms(ip, h))
        };
        let candidates: Vec<Value> = self
            .config
            .linked_hubs
            .iter()
            .map(|h| {
                let is_candidate =
                    eligible.as_ref().is_ok_and(|c| c.iter().any(|e| e.host_name == h.host_name));
                let why = if is_candidate {
                    if names_hubs {
                        "named by the enrollment"
                    } else {
                        "linked and takes part in allocation"
                    }
                } else if names_hubs {
                    "not named by the enrollment's iotHubs"
                } else {
                    "applyAllocationPolicy is false (used only when an enrollment names it)"
                };
                json!({"hostName": h.host_name, "allocationWeight": h.allocation_weight,
                    "applyAllocationPolicy": h.apply_allocation_policy, "location": h.location,
                    "latencyMs": latency(h), "candidate": is_candidate, "why": why})
            })
            .collect();
        out["allocation"] = json!({
            "policy": effective,
            "policySource": if policy.is_some() { "enrollment" } else { "instance default" },
            "hubs": candidates,
        });
        if let Err(e) = &eligible {
            out["allocation"]["error"] = json!({"errorCode": e.code.code(), "message": e.message});
        }
        let previous = ctx.registration.as_ref();
        let request = DeviceRequest {
            id_scope: self.config.id_scope.clone(),
            registration_id: self.registration_id.clone(),
            call: DeviceCall::Register { force: false },
            api_version: Some(self.api_version.clone()),
            credential,
            body: Vec::new(),
            client_address: self.client_address,
        };
        let reprovision = match device.enrollment() {
            MatchedEnrollment::Individual(e) => e.reprovision_policy,
            MatchedEnrollment::Group(g) => g.group().reprovision_policy,
        };
        let planned = plan_assignment(
            &self.config,
            &device,
            previous,
            &self.api_version,
            self.request.payload.clone(),
            &request,
        );
        let policy_effect = effective_policy(reprovision, &self.api_version);
        out["reprovision"] = json!({
            "policy": reprovision,
            "effective": policy_effect,
            "legacyApiVersion": self.api_version.is_legacy() && reprovision.is_none(),
            "previous": previous.and_then(|p| p.assigned_hub.as_ref().map(|h| json!({"hub": h, "deviceId": p.device_id}))),
        });
        match planned {
            Err(e) => {
                out["outcome"] = json!("failed");
                out["error"] = json!({"errorCode": e.code.code(), "message": e.message});
            }
            Ok(Planned::Custom(pending)) => {
                out["outcome"] = json!("customAllocation");
                out["allocation"]["linkedHubsOffered"] = json!(pending.linked);
                out["allocation"]["allocationRequest"] = pending
                    .call
                    .as_ref()
                    .map_or(Value::Null, |c| serde_json::to_value(&c.request).unwrap_or_default());
                out["explanation"] = json!("custom allocation: at registration the webhook (or the in-process hook) \
                    receives allocationRequest and chooses one of linkedHubsOffered; explain does not call it");
            }
            Ok(Planned::Ready(plan)) => {
                out["outcome"] = json!("assigned");
                let chosen = plan.target.hub.clone();
                let reason = match (effective, previous.and_then(|p| p.assigned_hub.as_ref())) {
                    (_, Some(h)) if !policy_effect.update_hub_assignment => {
                        format!("never reprovision: the device stays on its current hub {h}")
                    }
                    (AllocationPolicy::Static, _) => "static: the enrollment's single hub".to_owned(),
                    (AllocationPolicy::GeoLatency, _) => {
                        match self.config.latency.as_ref().zip(self.client_address) {
                            None => "geoLatency without a latency table or client address: weighted hash".to_owned(),
                            Some(_) => match self.config.linked_hubs.iter().find(|h| h.is_named(&chosen)).and_then(latency) {
                                Some(ms) => format!("geoLatency: the lowest latency from the client ({ms} ms); ties broken by the weighted hash"),
                                None => "geoLatency: no latency known for the client's network: weighted hash".to_owned(),
                            },
                        }
                    }
                    _ => "hashed: weighted rendezvous hash of the registration ID over the candidates"
                        .to_owned(),
                };
                out["allocation"]["chosenHub"] = json!(chosen);
                out["allocation"]["reason"] = json!(reason);
                out["reprovision"]["targetHub"] = json!(plan.target.hub);
                out["reprovision"]["deviceId"] = json!(plan.target.device_id);
                out["reprovision"]["substatus"] = json!(plan.substatus);
                out["reprovision"]["twin"] = json!(match &plan.twin {
                    TwinSource::Initial => "the enrollment's initial twin",
                    TwinSource::Keep => "kept as it is on the hub",
                    TwinSource::MigrateFrom(_) => "migrated from the previous hub",
                });
                out["reprovision"]["deletesPrevious"] =
                    json!(plan.delete_previous.map(|p| json!({"hub": p.hub, "deviceId": p.device_id})));
            }
        }
        out
    }
}

fn group_summary(g: &EnrollmentGroup) -> Value {
    json!({"enrollmentGroupId": g.enrollment_group_id, "attestationType": g.attestation.kind,
        "provisioningStatus": g.provisioning_status.unwrap_or_default()})
}

fn enrollment_summary(e: &MatchedEnrollment) -> Value {
    match e {
        MatchedEnrollment::Individual(e) => {
            json!({"kind": "individualEnrollment", "registrationId": e.registration_id,
            "attestationType": e.attestation.kind, "provisioningStatus": e.provisioning_status.unwrap_or_default()})
        }
        MatchedEnrollment::Group(g) => {
            let mut v = group_summary(g.group());
            v["kind"] = json!("enrollmentGroup");
            v
        }
    }
}
