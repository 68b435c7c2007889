//! The typed service API: [`ServiceCommand`]s executed under a [`Principal`].
//!
//! HTTP is one adapter onto these commands (route + headers + JSON body → command, after the SAS token has
//! been verified into a principal). An embedder builds commands directly and executes them with a
//! principal it grants in-process ([`Principal::granted`]), without tokens or JSON:
//!
//! ```
//! use dps_core::command::{Principal, ServiceCommand};
//! use dps_core::proto::RegistrationId;
//! use dps_core::Rights;
//! let admin = Principal::granted("backend", Rights::ALL);
//! let get = ServiceCommand::GetEnrollment { registration_id: RegistrationId::parse("dev-1").unwrap() };
//! assert!(admin.allows(&get));
//! ```

use crate::audit::AuditFilter;
use crate::config::Rights;
use dps_policy::BillableOperation;
use dps_proto::model::{
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, EnrollmentGroup, IndividualEnrollment,
};
use dps_proto::{EnrollmentGroupId, IfMatch, RegistrationId};

/// Who is executing a service command, and with which rights. Built from a verified service SAS token
/// (the HTTP adapter, `Engine::http`) or granted in-process by an embedder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: String,
    rights: Rights,
}

impl Principal {
    /// A principal an embedder grants in-process (no token): its name shows in messages and logs.
    pub fn granted(name: impl Into<String>, rights: Rights) -> Principal {
        Principal { name: name.into(), rights }
    }

    /// The shared access policy that verified (or the embedder's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its rights.
    pub fn rights(&self) -> Rights {
        self.rights
    }

    /// Whether it holds every right `command` needs.
    pub fn allows(&self, command: &ServiceCommand) -> bool {
        self.rights.contains(command.rights())
    }
}

/// Paging of a query: at most `max_items` (the instance default when `None`, capped at its maximum),
/// after the position of a continuation token from a previous page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paging {
    /// Page size (`x-ms-max-item-count`).
    pub max_items: Option<usize>,
    /// Continuation token (`x-ms-continuation`) of the previous page.
    pub continuation: Option<String>,
}

/// One service API operation (spec §5), typed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServiceCommand {
    /// Create or replace an individual enrollment (keys left out are generated for a new one and kept
    /// from the stored one on replace).
    PutEnrollment {
        /// The enrollment.
        enrollment: Box<IndividualEnrollment>,
        /// Replace only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Read an individual enrollment (secrets hidden).
    GetEnrollment {
        /// Its registration ID.
        registration_id: RegistrationId,
    },
    /// Delete an individual enrollment.
    DeleteEnrollment {
        /// Its registration ID.
        registration_id: RegistrationId,
        /// Delete only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Read an individual enrollment's attestation mechanism (with keys).
    GetEnrollmentAttestation {
        /// Its registration ID.
        registration_id: RegistrationId,
    },
    /// Query individual enrollments (`SELECT * FROM enrollments [WHERE …]`; empty = all).
    QueryEnrollments {
        /// The query text.
        query: String,
        /// Paging.
        paging: Paging,
    },
    /// Create or replace an enrollment group.
    PutGroup {
        /// The group.
        group: Box<EnrollmentGroup>,
        /// Replace only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Read an enrollment group (secrets hidden).
    GetGroup {
        /// Its ID.
        group_id: EnrollmentGroupId,
    },
    /// Delete an enrollment group.
    DeleteGroup {
        /// Its ID.
        group_id: EnrollmentGroupId,
        /// Delete only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Read an enrollment group's attestation mechanism (with keys).
    GetGroupAttestation {
        /// Its ID.
        group_id: EnrollmentGroupId,
    },
    /// Query enrollment groups (`SELECT * FROM enrollmentGroups [WHERE …]`; empty = all).
    QueryGroups {
        /// The query text.
        query: String,
        /// Paging.
        paging: Paging,
    },
    /// Read a device registration state.
    GetRegistration {
        /// Its registration ID.
        registration_id: RegistrationId,
    },
    /// Explain, without changing anything, what a registration of this device would do: which enrollment
    /// matches, which hubs are candidates and why, which hub the policy chooses, what the reprovision
    /// policy does (an extension of this service; see [`crate::explain`]).
    Explain {
        /// The registration ID.
        registration_id: RegistrationId,
        /// The device to explain (credential, address, payload).
        request: Box<dps_proto::allocation::ExplainRequest>,
    },
    /// Delete a device registration state (the device may then register through another enrollment).
    DeleteRegistration {
        /// Its registration ID.
        registration_id: RegistrationId,
        /// Delete only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// The registration states of an enrollment group's devices.
    QueryRegistrations {
        /// The group.
        group_id: EnrollmentGroupId,
        /// Paging.
        paging: Paging,
    },
    /// A bulk operation on individual enrollments (1-10 items).
    BulkEnrollments(BulkEnrollmentOperation),
    /// A bulk operation on enrollment groups (1-10 items).
    BulkGroups(BulkEnrollmentGroupOperation),
    /// Upload or replace a CA certificate (spec §5.7). A replace keeps the creation time, sets
    /// `isVerified` to `is_verified` and drops any verification code.
    PutCertificate {
        /// Its name (ASCII alphanumerics, `-`, `.`, `_`).
        name: String,
        /// The certificate, PEM or base64 DER; must be a v3 CA certificate.
        certificate_text: String,
        /// Set it verified on upload (no proof of possession).
        is_verified: bool,
        /// Replace only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Read a CA certificate.
    GetCertificate {
        /// Its name.
        name: String,
    },
    /// Every CA certificate, ordered by name.
    ListCertificates,
    /// Delete a CA certificate.
    DeleteCertificate {
        /// Its name.
        name: String,
        /// Delete only if the stored ETag matches.
        if_match: Option<IfMatch>,
    },
    /// Issue a new verification code for a CA certificate (the reply carries it; the ETag changes).
    GenerateVerificationCode {
        /// Its name.
        name: String,
        /// The ETag the caller read (`*` for any).
        if_match: IfMatch,
    },
    /// Prove possession of a CA certificate's private key: a certificate whose subject CN is the last
    /// verification code, signed by the CA. Success marks the CA verified.
    VerifyCertificate {
        /// Its name.
        name: String,
        /// The ETag the caller read (`*` for any).
        if_match: IfMatch,
        /// The verification certificate, PEM or base64 DER.
        certificate_text: String,
    },
    /// Read the audit log, newest first (an extension, not an Azure operation; needs `ServiceConfig`).
    QueryAudit {
        /// Which records.
        filter: AuditFilter,
        /// Paging (the continuation names a sequence number).
        paging: Paging,
    },
}

impl ServiceCommand {
    /// The rights a principal needs to execute it.
    pub fn rights(&self) -> Rights {
        use ServiceCommand as C;
        match self {
            C::GetEnrollment { .. }
            | C::GetEnrollmentAttestation { .. }
            | C::QueryEnrollments { .. }
            | C::GetGroup { .. }
            | C::GetGroupAttestation { .. }
            | C::QueryGroups { .. } => Rights::ENROLLMENT_READ,
            C::PutEnrollment { .. }
            | C::DeleteEnrollment { .. }
            | C::BulkEnrollments(_)
            | C::PutGroup { .. }
            | C::DeleteGroup { .. }
            | C::BulkGroups(_) => Rights::ENROLLMENT_WRITE,
            C::GetRegistration { .. } | C::QueryRegistrations { .. } => Rights::REGISTRATION_STATUS_READ,
            C::Explain { .. } => Rights::ENROLLMENT_READ.union(Rights::REGISTRATION_STATUS_READ),
            C::DeleteRegistration { .. } => Rights::REGISTRATION_STATUS_WRITE,
            C::PutCertificate { .. }
            | C::GetCertificate { .. }
            | C::ListCertificates
            | C::DeleteCertificate { .. }
            | C::GenerateVerificationCode { .. }
            | C::VerifyCertificate { .. }
            | C::QueryAudit { .. } => Rights::SERVICE_CONFIG,
        }
    }

    /// The billable operation it is metered as (spec §10.3); `None` for the certificate operations, which
    /// are not billable (spec §5.7).
    pub fn billable(&self) -> Option<BillableOperation> {
        use BillableOperation as B;
        use ServiceCommand as C;
        Some(match self {
            C::GetEnrollment { .. } => B::EnrollmentGet,
            C::PutEnrollment { .. } => B::EnrollmentCreateOrUpdate,
            C::DeleteEnrollment { .. } => B::EnrollmentDelete,
            C::GetEnrollmentAttestation { .. } => B::EnrollmentGetAttestationMechanism,
            C::BulkEnrollments(_) => B::EnrollmentBulk,
            C::QueryEnrollments { .. } => B::EnrollmentQuery,
            C::GetGroup { .. } => B::EnrollmentGroupGet,
            C::PutGroup { .. } => B::EnrollmentGroupCreateOrUpdate,
            C::DeleteGroup { .. } => B::EnrollmentGroupDelete,
            C::GetGroupAttestation { .. } => B::EnrollmentGroupGetAttestationMechanism,
            C::BulkGroups(_) => B::EnrollmentGroupBulk,
            C::QueryGroups { .. } => B::EnrollmentGroupQuery,
            C::GetRegistration { .. } => B::RegistrationStateGet,
            C::DeleteRegistration { .. } => B::RegistrationStateDelete,
            C::QueryRegistrations { .. } => B::RegistrationStateQuery,
            C::PutCertificate { .. }
            | C::GetCertificate { .. }
            | C::ListCertificates
            | C::DeleteCertificate { .. }
            | C::GenerateVerificationCode { .. }
            | C::VerifyCertificate { .. }
            | C::Explain { .. }
            | C::QueryAudit { .. } => return None,
        })
    }
}
