//! JSON wire models with Azure's exact field names (spec §1.5, §1.6, §5.3, §5.4, §5.6).
//!
//! Models never deny unknown fields (clients send extras) and skip absent optional fields when serializing.
//! Identifiers are plain strings here: the engine parses them with [`crate::id`] so that a bad identifier
//! gets its own error code instead of a generic JSON error.

use serde::{Deserialize, Serialize};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Device API
// ------------------------------------------------------------------------------------------------

/// Body of PUT register and POST status lookup (`DeviceRegistration`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// Registration ID; optional on the wire (C# MQTT/AMQP omit it), the address is authoritative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// TPM endorsement and storage root keys (TPM devices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// Custom payload; `null` is treated as absent.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "null_as_none")]
    pub payload: Option<Value>,
    /// Base64 DER PKCS#10 certificate signing request (2025-07-01-preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

fn null_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(if v.is_null() { None } else { Some(v) })
}

/// Registration status as seen by devices and the service API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    /// Not yet assigned (never sent to devices).
    Unassigned,
    /// Assignment in progress.
    Assigning,
    /// Assigned to a hub.
    Assigned,
    /// Assignment failed (see errorCode/errorMessage).
    Failed,
    /// The enrollment is disabled.
    Disabled,
}

impl RegistrationStatus {
    /// Whether this status ends an operation (assigned, failed, disabled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RegistrationStatus::Assigned | RegistrationStatus::Failed | RegistrationStatus::Disabled
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationStatus::Unassigned => "unassigned",
            RegistrationStatus::Assigning => "assigning",
            RegistrationStatus::Assigned => "assigned",
            RegistrationStatus::Failed => "failed",
            RegistrationStatus::Disabled => "disabled",
        }
    }
}

/// Why a device is on its hub (spec §9.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationSubstatus {
    /// Assigned to a hub for the first time.
    InitialAssignment,
    /// Moved to a different hub with its twin and capabilities migrated.
    DeviceDataMigrated,
    /// Moved (or reset) with data taken from the enrollment's initial state.
    DeviceDataReset,
    /// Re-provisioned to the previously assigned hub.
    ReprovisionedToInitialAssignment,
}

/// Body of PUT register and GET operation status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// The operation ID (always present).
    pub operation_id: String,
    /// Operation status (always present).
    pub status: RegistrationStatus,
    /// The registration result, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult>,
}

/// The `registrationState` object; also the body of POST status lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    /// X.509 details (X.509 devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// Symmetric-key details (`enrollmentGroupId` when matched through a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    /// TPM details (the hub authentication key blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmRegistrationResult>,
    /// Registration ID.
    pub registration_id: String,
    /// When the registration record was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned IoT hub host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device ID in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    pub status: RegistrationStatus,
    /// Substatus (assigned only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    /// Six-digit error code (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Registration record ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Custom payload returned to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Issued certificate chain, leaf first (2025-07-01-preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

impl DeviceRegistrationResult {
    /// A result with only `registrationId` and `status` (what polls carry while assigning).
    pub fn minimal(registration_id: &str, status: RegistrationStatus) -> Self {
        DeviceRegistrationResult {
            x509: None,
            symmetric_key: None,
            tpm: None,
            registration_id: registration_id.to_owned(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            issued_certificate_chain: None,
        }
    }
}

/// `registrationState.symmetricKey`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    /// The group the device was matched through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
}

/// `registrationState.x509`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    /// The device certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<X509CertificateInfo>,
    /// The group the device was matched through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The signing certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<X509CertificateInfo>,
}

/// `registrationState.tpm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationResult {
    /// Base64 activation blob carrying the hub key.
    pub authentication_key: String,
}

// ------------------------------------------------------------------------------------------------
// Service API
// ------------------------------------------------------------------------------------------------

/// Attestation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    /// No attestation.
    None,
    /// TPM 2.0.
    Tpm,
    /// X.509 certificates.
    X509,
    /// Symmetric keys.
    SymmetricKey,
}

/// `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    /// Which mechanism.
    #[serde(rename = "type")]
    pub kind: AttestationType,
    /// TPM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// X.509 certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    /// Symmetric keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

impl AttestationMechanism {
    /// A symmetric-key mechanism with the given keys.
    pub fn symmetric_key(primary: Option<String>, secondary: Option<String>) -> Self {
        AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: Some(SymmetricKeyAttestation { primary_key: primary, secondary_key: secondary }),
        }
    }

    /// The same mechanism with every secret removed (what GET returns, spec §5.6).
    pub fn without_secrets(&self) -> Self {
        AttestationMechanism {
            kind: self.kind,
            tpm: None,
            x509: self.x509.as_ref().map(X509Attestation::without_certificates),
            symmetric_key: None,
        }
    }
}

/// `TpmAttestation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// Base64 TPM2B_PUBLIC of the endorsement key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement_key: Option<String>,
    /// Base64 TPM2B_PUBLIC of the storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// `SymmetricKeyAttestation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    /// Base64 primary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Base64 secondary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// `X509Attestation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Device certificates (individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    /// Root or intermediate certificates (groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    /// Names of verified CA certificates of the instance (groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

impl X509Attestation {
    /// The same attestation with certificates removed and only their info kept.
    pub fn without_certificates(&self) -> Self {
        let strip = |c: &X509Certificates| X509Certificates {
            primary: c
                .primary
                .as_ref()
                .map(|x| X509CertificateWithInfo { certificate: None, info: x.info.clone() }),
            secondary: c
                .secondary
                .as_ref()
                .map(|x| X509CertificateWithInfo { certificate: None, info: x.info.clone() }),
        };
        X509Attestation {
            client_certificates: self.client_certificates.as_ref().map(strip),
            signing_certificates: self.signing_certificates.as_ref().map(strip),
            ca_references: self.ca_references.clone(),
        }
    }
}

/// `X509Certificates`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    /// Primary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    /// Secondary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// `X509CertificateWithInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    /// PEM or base64 DER certificate (write only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Parsed certificate details (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
}

/// `X509CertificateInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    /// Subject distinguished name.
    pub subject_name: String,
    /// SHA-1 thumbprint, hex.
    pub sha1_thumbprint: String,
    /// SHA-256 thumbprint, hex.
    pub sha256_thumbprint: String,
    /// Issuer distinguished name.
    pub issuer_name: String,
    /// Validity start.
    pub not_before_utc: String,
    /// Validity end.
    pub not_after_utc: String,
    /// Serial number, hex.
    pub serial_number: String,
    /// X.509 version.
    pub version: i32,
}

/// `X509CAReferences`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    /// Primary CA certificate name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Secondary CA certificate name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// `ReprovisionPolicy` (both fields default to true).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-run allocation on re-registration (false = never re-provision).
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    /// Move the device's twin and capabilities when it changes hub (false = reset to initial config).
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true }
    }
}

/// Allocation policy of an enrollment (or the instance default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AllocationPolicy {
    /// Evenly weighted distribution.
    #[serde(rename = "hashed", alias = "Hashed")]
    Hashed,
    /// Lowest latency.
    #[serde(rename = "geoLatency", alias = "geolatency", alias = "GeoLatency")]
    GeoLatency,
    /// Static configuration (exactly one hub).
    #[serde(rename = "static", alias = "Static")]
    Static,
    /// Custom webhook.
    #[serde(rename = "custom", alias = "Custom")]
    Custom,
}

/// `CustomAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    /// Webhook URL.
    pub webhook_url: String,
    /// API version of the enrollment object sent to the webhook.
    pub api_version: String,
}

/// Provisioning status of an enrollment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    /// Devices may provision.
    #[default]
    Enabled,
    /// Devices are refused with status `disabled`.
    Disabled,
}

/// `DeviceCapabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// The device is an IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
}

/// `InitialTwin`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    /// Twin tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    /// Twin properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<InitialTwinProperties>,
}

/// `InitialTwinProperties`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwinProperties {
    /// Desired properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
}

/// `IndividualEnrollment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    /// Registration ID.
    pub registration_id: String,
    /// Desired hub device ID (defaults to the registration ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The device's registration state (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    /// Attestation mechanism.
    pub attestation: AttestationMechanism,
    /// Deprecated single hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    /// ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Reprovisioning policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Creation time (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last update time (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy (absent: instance default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Candidate hubs (absent: all linked hubs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Optional device information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
}

/// `EnrollmentGroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// Group ID.
    pub enrollment_group_id: String,
    /// Attestation mechanism.
    pub attestation: AttestationMechanism,
    /// Deprecated single hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    /// ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Reprovisioning policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Creation time (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last update time (read only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy (absent: instance default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Candidate hubs (absent: all linked hubs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
}

/// `DeviceRegistrationState` (service view of a registration record; read only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    /// Registration ID.
    pub registration_id: String,
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device ID in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    pub status: RegistrationStatus,
    /// Substatus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    /// Error code (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message (failed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Last payload returned to the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// Bulk operation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BulkOperationMode {
    /// Fail items that already exist.
    Create,
    /// Create or replace.
    Update,
    /// Replace only if the item's etag matches.
    #[serde(rename = "updateIfMatchETag", alias = "updateIfMatchEtag")]
    UpdateIfMatchEtag,
    /// Delete (honouring the item's etag when present).
    Delete,
}

/// `BulkEnrollmentOperation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    /// The enrollments.
    pub enrollments: Vec<IndividualEnrollment>,
    /// The mode.
    pub mode: BulkOperationMode,
}

/// `BulkEnrollmentGroupOperation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    /// The groups.
    pub enrollment_groups: Vec<EnrollmentGroup>,
    /// The mode.
    pub mode: BulkOperationMode,
}

/// `BulkEnrollmentOperationResult` (also used for groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationResult {
    /// True when every item succeeded.
    pub is_successful: bool,
    /// Per-item errors.
    #[serde(default)]
    pub errors: Vec<BulkEnrollmentOperationError>,
}

/// One failed item of a bulk operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationError {
    /// The item's registration ID (individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The item's group ID (groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// Six-digit error code.
    pub error_code: u32,
    /// Error message.
    pub error_status: String,
}

/// `QuerySpecification`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpecification {
    /// SQL-like query text.
    #[serde(default)]
    pub query: String,
}

/// Body of the TPM 401 challenge (spec §1.9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationChallenge {
    /// Base64 activation blob.
    pub authentication_key: String,
    /// Always `registration`.
    pub key_name: String,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(v: Value) {
        let parsed: T = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), v);
    }

    #[test]
    fn payload_null_is_absent() {
        let r: DeviceRegistration =
            serde_json::from_str(r#"{"payload": null, "registrationId": "dev"}"#).unwrap();
        assert_eq!(r.payload, None);
        assert_eq!(r.registration_id.as_deref(), Some("dev"));
        let r: DeviceRegistration = serde_json::from_str(r#"{"payload": {"a": 1}}"#).unwrap();
        assert_eq!(r.payload, Some(json!({"a": 1})));
        let r: DeviceRegistration = serde_json::from_str(r#"{"extra": 1}"#).unwrap();
        assert_eq!(r, DeviceRegistration::default());
    }

    #[test]
    fn enrollment_round_trip() {
        round_trip::<IndividualEnrollment>(json!({
            "registrationId": "dev1",
            "deviceId": "dev1-device",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "a", "secondaryKey": "b"}},
            "capabilities": {"iotEdge": true},
            "initialTwin": {"tags": {"site": "x"}, "properties": {"desired": {"interval": 5}}},
            "etag": "abc",
            "provisioningStatus": "disabled",
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
            "allocationPolicy": "static",
            "iotHubs": ["hub1.azure-devices.net"]
        }));
    }

    #[test]
    fn allocation_policy_spellings() {
        for (s, p) in [
            ("\"geoLatency\"", AllocationPolicy::GeoLatency),
            ("\"geolatency\"", AllocationPolicy::GeoLatency),
            ("\"GeoLatency\"", AllocationPolicy::GeoLatency),
            ("\"Hashed\"", AllocationPolicy::Hashed),
        ] {
            assert_eq!(serde_json::from_str::<AllocationPolicy>(s).unwrap(), p);
        }
        assert_eq!(serde_json::to_string(&AllocationPolicy::GeoLatency).unwrap(), "\"geoLatency\"");
    }

    #[test]
    fn reprovision_policy_defaults() {
        let p: ReprovisionPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, ReprovisionPolicy::default());
        assert!(p.update_hub_assignment && p.migrate_device_data);
    }

    #[test]
    fn secrets_are_removed() {
        let m = AttestationMechanism::symmetric_key(Some("k1".into()), Some("k2".into()));
        assert_eq!(serde_json::to_value(m.without_secrets()).unwrap(), json!({"type": "symmetricKey"}));
    }

    #[test]
    fn bulk_modes() {
        let b: BulkEnrollmentOperation = serde_json::from_value(json!({
            "mode": "updateIfMatchETag",
            "enrollments": [{"registrationId": "a", "attestation": {"type": "symmetricKey"}}]
        }))
        .unwrap();
        assert_eq!(b.mode, BulkOperationMode::UpdateIfMatchEtag);
        round_trip::<BulkEnrollmentOperationResult>(json!({
            "isSuccessful": false,
            "errors": [{"registrationId": "a", "errorCode": 409000, "errorStatus": "exists"}]
        }));
    }
}
