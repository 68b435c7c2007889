//! Instance configuration: what Azure keeps in the DPS resource (ARM): ID scope, linked hubs, default
//! allocation, shared access policies (spec §5.7).

use dps_policy::LinkedHub;
use dps_proto::model::AllocationPolicy;
use dps_proto::sas::SymmetricKey;
use dps_proto::{DpsError, ErrorCode, IdScope};

/// Rights of a shared access policy (spec §5.1), as a small bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    /// Instance configuration.
    pub const SERVICE_CONFIG: Rights = Rights(1);
    /// Read enrollments and groups (and their attestation mechanisms).
    pub const ENROLLMENT_READ: Rights = Rights(2);
    /// Create, update, delete enrollments and groups; bulk operations.
    pub const ENROLLMENT_WRITE: Rights = Rights(4);
    /// Read and query registration states.
    pub const REGISTRATION_STATUS_READ: Rights = Rights(8);
    /// Delete registration states.
    pub const REGISTRATION_STATUS_WRITE: Rights = Rights(16);
    /// Device connect (unused by the service API).
    pub const DEVICE_CONNECT: Rights = Rights(32);
    /// Every right (the `provisioningserviceowner` policy).
    pub const ALL: Rights = Rights(63);

    /// The union of two right sets.
    #[must_use]
    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Whether every right of `needed` is in `self`.
    pub const fn contains(self, needed: Rights) -> bool {
        self.0 & needed.0 == needed.0
    }

    /// Parses ARM's comma-separated form, e.g. `"EnrollmentRead, EnrollmentWrite"` (names
    /// case-insensitive).
    pub fn parse(s: &str) -> Result<Rights, DpsError> {
        let mut r = Rights::default();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let one = match name.to_ascii_lowercase().as_str() {
                "serviceconfig" => Rights::SERVICE_CONFIG,
                "enrollmentread" => Rights::ENROLLMENT_READ,
                "enrollmentwrite" => Rights::ENROLLMENT_WRITE,
                "registrationstatusread" => Rights::REGISTRATION_STATUS_READ,
                "registrationstatuswrite" => Rights::REGISTRATION_STATUS_WRITE,
                "deviceconnect" => Rights::DEVICE_CONNECT,
                _ => {
                    return Err(DpsError::with_message(
                        ErrorCode::BadRequest,
                        format!("unknown right '{name}'; expected ServiceConfig, EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite or DeviceConnect"),
                    ))
                }
            };
            r = r.union(one);
        }
        Ok(r)
    }

    /// The ARM names of the rights in this set.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Rights::SERVICE_CONFIG, "ServiceConfig"),
            (Rights::ENROLLMENT_READ, "EnrollmentRead"),
            (Rights::ENROLLMENT_WRITE, "EnrollmentWrite"),
            (Rights::REGISTRATION_STATUS_READ, "RegistrationStatusRead"),
            (Rights::REGISTRATION_STATUS_WRITE, "RegistrationStatusWrite"),
            (Rights::DEVICE_CONNECT, "DeviceConnect"),
        ]
        .into_iter()
        .filter(|(r, _)| self.contains(*r))
        .map(|(_, n)| n)
        .collect()
    }
}

/// A shared access policy of the service API.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Policy name (the token's `skn`).
    pub key_name: String,
    /// Primary key.
    pub primary_key: SymmetricKey,
    /// Secondary key.
    pub secondary_key: SymmetricKey,
    /// What the policy may do.
    pub rights: Rights,
}

/// The name of the all-rights policy every instance has.
pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The one ID scope this instance serves.
    pub id_scope: IdScope,
    /// Host name of the service API (the audience of service SAS tokens).
    pub service_host_name: String,
    /// Linked IoT hubs.
    pub linked_hubs: Vec<LinkedHub>,
    /// Allocation policy for enrollments that set none (not `custom`).
    pub default_allocation: AllocationPolicy,
    /// Retry-After sent with 202 answers, in seconds (clamped to 1..=300).
    pub retry_after_secs: u32,
    /// Shared access policies of the service API.
    pub access_policies: Vec<AccessPolicy>,
    /// Answer a register request with 202 as soon as the device is authenticated, and finish the assignment
    /// afterwards (polls see `assigning` meanwhile). Off: the assignment is committed before the 202.
    pub respond_before_assignment: bool,
    /// Query page size when the client sends no `x-ms-max-item-count`.
    pub default_page_size: usize,
    /// Largest accepted page size.
    pub max_page_size: usize,
    /// The most symmetric-key enrollment groups the instance holds (spec §10.1: 100 in Azure). A device
    /// whose key fits no group is checked against each of them, so this bounds the work an
    /// unauthenticated register can cause.
    pub max_symmetric_key_groups: usize,
    /// Whether a register may carry a `csr` (spec §7.6): set by a host that has a certificate issuer
    /// (`dps_host::HostBuilder::issuer`). Off: a `csr` is refused with 400008.
    pub certificate_issuance: bool,
    /// The most CA certificates the instance holds (spec §10.1: 25 in Azure).
    pub max_ca_certificates: usize,
    /// Whether an in-process allocation hook decides custom allocations (set by a host given one,
    /// `dps_host::HostBuilder::allocation_hook`). Then an enrollment with `allocationPolicy: custom` may
    /// omit `customAllocationDefinition`; without a hook it must name a webhook, as in Azure.
    pub allocation_hook: bool,
    /// Accept `http://` webhook URLs (local development only; Azure requires `https://`).
    pub insecure_webhooks: bool,
    /// Latency figures for `geoLatency` allocation (a [`dps_policy::LatencyTable`] or live measurements).
    /// None, or a device whose address the transport did not pass, or a network the source does not know:
    /// `geoLatency` allocates like `hashed`.
    pub latency: Option<std::sync::Arc<dyn dps_policy::LatencySource>>,
}

impl EngineConfig {
    /// A configuration with defaults: hashed allocation, Retry-After 2 s, page size 100 (max 1000),
    /// assignment committed before the 202.
    pub fn new(id_scope: IdScope, service_host_name: impl Into<String>, linked_hubs: Vec<LinkedHub>) -> Self {
        EngineConfig {
            id_scope,
            service_host_name: service_host_name.into(),
            linked_hubs,
            default_allocation: AllocationPolicy::Hashed,
            retry_after_secs: 2,
            access_policies: Vec::new(),
            respond_before_assignment: false,
            default_page_size: 100,
            max_page_size: 1000,
            max_symmetric_key_groups: 100,
            certificate_issuance: false,
            max_ca_certificates: 25,
            allocation_hook: false,
            insecure_webhooks: false,
            latency: None,
        }
    }

    /// Adds a shared access policy.
    #[must_use]
    pub fn with_policy(mut self, policy: AccessPolicy) -> Self {
        self.access_policies.push(policy);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), DpsError> {
        if self.default_allocation == AllocationPolicy::Custom {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                "custom allocation cannot be the instance default",
            ));
        }
        if self.service_host_name.is_empty() {
            return Err(DpsError::with_message(ErrorCode::BadRequest, "the service host name is empty"));
        }
        if self.default_page_size == 0 || self.max_page_size < self.default_page_size {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                "page sizes must satisfy 1 <= default <= max",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_parse_and_contain() {
        let r = Rights::parse("EnrollmentRead, registrationstatusread").unwrap();
        assert!(r.contains(Rights::ENROLLMENT_READ));
        assert!(!r.contains(Rights::ENROLLMENT_WRITE));
        assert_eq!(r.names(), vec!["EnrollmentRead", "RegistrationStatusRead"]);
        assert!(Rights::ALL.contains(r));
        assert_eq!(Rights::parse("Nope").unwrap_err().code, ErrorCode::BadRequest);
    }
}
