//! `dps-server export` / `import`: a deployment's data as JSON Lines, to move it between SQLite and
//! PostgreSQL or between machines.
//!
//! One JSON object per line, `{"kind": …, "item": …}`, in this order: `certificate` (a CA certificate:
//! name, DER as base64, verification state, times, ETag), `group` (an enrollment group as the service API
//! writes it), `enrollment` (an individual enrollment) and `registration` (a device registration record).
//! Enrollments and groups carry their secrets **in the clear** (symmetric keys, webhook URLs): the file is
//! written with mode 0600 and must be handled like a key; the importing store seals them again with its
//! own keys. A registration's operation history is not carried (only its current operation), and a
//! registration whose enrollment or group no longer exists is not exported (the store contract lists
//! registrations by enrollment group; individual ones are read by their enrollment's ID).
//!
//! Import writes every item with create-or-replace (ETags, creation times and records kept as exported);
//! it runs against a stopped or a running server alike (a running one sees the imported items on its next
//! read).

use crate::state::ServerStore;
use crate::ServerError;
use base64::Engine as _;
use dps_core::proto::certificate::CaCertificate;
use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::proto::query::{Query, QuerySource};
use dps_core::proto::{EnrollmentGroupId, Etag, RegistrationId, Timestamp};
use dps_core::store::{
    AsyncStore, PageRequest, RegistrationRecord, StoreError, StoreOp, StoreResult, WriteCondition,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{BufRead, Write};

/// Items read per store round trip.
const PAGE: usize = 500;

/// How many items of each kind an export wrote or an import read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// CA certificates.
    pub certificates: usize,
    /// Enrollment groups.
    pub groups: usize,
    /// Individual enrollments.
    pub enrollments: usize,
    /// Registration records.
    pub registrations: usize,
}

/// A CA certificate as a line carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertificateLine {
    name: String,
    der: String,
    is_verified: bool,
    verification_code: Option<String>,
    created_unix_nanos: i64,
    updated_unix_nanos: i64,
    etag: String,
}

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", content = "item", rename_all = "camelCase")]
enum Line {
    Certificate(CertificateLine),
    Group(Box<EnrollmentGroup>),
    Enrollment(Box<IndividualEnrollment>),
    Registration(Box<RegistrationRecord>),
}

fn store_error(what: &str, e: StoreError) -> ServerError {
    ServerError::Client(format!("{what}: {e}"))
}

async fn run(store: &ServerStore, op: StoreOp, what: &str) -> Result<StoreResult, ServerError> {
    store.execute(op).await.map_err(|e| store_error(what, e))
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<(), ServerError> {
    let json = serde_json::to_string(line).map_err(|e| ServerError::Client(format!("serializing: {e}")))?;
    writeln!(out, "{json}").map_err(|e| ServerError::io("writing the export", e))
}

fn unexpected(what: &str) -> ServerError {
    ServerError::Client(format!("the store answered something unexpected while {what}"))
}

/// Writes every CA certificate, group, enrollment and registration record of `store` to `out`.
pub async fn export(store: &ServerStore, out: &mut impl Write) -> Result<Counts, ServerError> {
    let mut counts = Counts::default();
    let StoreResult::Certificates(certificates) =
        run(store, StoreOp::ListCertificates, "listing CA certificates").await?
    else {
        return Err(unexpected("listing CA certificates"));
    };
    for c in certificates {
        write_line(
            out,
            &Line::Certificate(CertificateLine {
                der: base64::engine::general_purpose::STANDARD.encode(&c.der),
                name: c.name,
                is_verified: c.is_verified,
                verification_code: c.verification_code,
                created_unix_nanos: c.created.unix_nanos(),
                updated_unix_nanos: c.updated.unix_nanos(),
                etag: c.etag.as_str().to_owned(),
            }),
        )?;
        counts.certificates += 1;
    }
    let mut exported = BTreeSet::new();
    let mut after = None;
    loop {
        let op = StoreOp::QueryGroups {
            query: Query { source: QuerySource::EnrollmentGroups, conditions: Vec::new() },
            page: PageRequest { after: after.take(), limit: PAGE },
        };
        let StoreResult::Groups(page) = run(store, op, "listing enrollment groups").await? else {
            return Err(unexpected("listing enrollment groups"));
        };
        for group in page.items {
            let id = EnrollmentGroupId::parse(&group.enrollment_group_id)
                .map_err(|e| ServerError::Client(format!("a stored group ID is invalid: {e}")))?;
            write_line(out, &Line::Group(Box::new(group)))?;
            counts.groups += 1;
            let mut after_registration = None;
            loop {
                let op = StoreOp::QueryRegistrations {
                    group_id: id.clone(),
                    page: PageRequest { after: after_registration.take(), limit: PAGE },
                };
                let StoreResult::Registrations(page) = run(store, op, "listing registrations").await? else {
                    return Err(unexpected("listing registrations"));
                };
                for record in page.items {
                    exported.insert(record.registration_id.key().to_owned());
                    write_line(out, &Line::Registration(Box::new(record)))?;
                    counts.registrations += 1;
                }
                match page.next {
                    Some(next) => after_registration = Some(next),
                    None => break,
                }
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut after = None;
    loop {
        let op = StoreOp::QueryEnrollments {
            query: Query { source: QuerySource::Enrollments, conditions: Vec::new() },
            page: PageRequest { after: after.take(), limit: PAGE },
        };
        let StoreResult::Enrollments(page) = run(store, op, "listing enrollments").await? else {
            return Err(unexpected("listing enrollments"));
        };
        for enrollment in page.items {
            let id = RegistrationId::parse(&enrollment.registration_id)
                .map_err(|e| ServerError::Client(format!("a stored registration ID is invalid: {e}")))?;
            write_line(out, &Line::Enrollment(Box::new(enrollment)))?;
            counts.enrollments += 1;
            if exported.contains(id.key()) {
                continue;
            }
            let op = StoreOp::GetRegistration { registration_id: id };
            if let StoreResult::Registration(Some(record)) = run(store, op, "reading a registration").await? {
                write_line(out, &Line::Registration(record))?;
                counts.registrations += 1;
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    out.flush().map_err(|e| ServerError::io("writing the export", e))?;
    Ok(counts)
}

/// Reads an export from `input` and writes every item into `store` (create or replace).
pub async fn import(store: &ServerStore, input: impl BufRead) -> Result<Counts, ServerError> {
    let mut counts = Counts::default();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| ServerError::io("reading the import", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: &str| format!("line {}: {what}", n + 1);
        let parsed: Line = serde_json::from_str(&line)
            .map_err(|e| ServerError::Client(at(&format!("not an export line: {e}"))))?;
        match parsed {
            Line::Certificate(c) => {
                let der = base64::engine::general_purpose::STANDARD.decode(&c.der).map_err(|e| {
                    ServerError::Client(at(&format!("the certificate's DER is not base64: {e}")))
                })?;
                let etag =
                    Etag::parse(&c.etag).map_err(|e| ServerError::Client(at(&format!("bad ETag: {e}"))))?;
                let certificate = CaCertificate {
                    name: c.name,
                    der,
                    is_verified: c.is_verified,
                    verification_code: c.verification_code,
                    created: Timestamp::from_unix_nanos(c.created_unix_nanos),
                    updated: Timestamp::from_unix_nanos(c.updated_unix_nanos),
                    etag,
                };
                let op = StoreOp::PutCertificate {
                    certificate: Box::new(certificate),
                    condition: WriteCondition::Upsert,
                    max_certificates: None,
                };
                run(store, op, &at("importing a CA certificate")).await?;
                counts.certificates += 1;
            }
            Line::Group(group) => {
                let op = StoreOp::PutGroup {
                    group,
                    condition: WriteCondition::Upsert,
                    max_symmetric_key_groups: None,
                };
                run(store, op, &at("importing an enrollment group")).await?;
                counts.groups += 1;
            }
            Line::Enrollment(enrollment) => {
                let op = StoreOp::PutEnrollment { enrollment, condition: WriteCondition::Upsert };
                run(store, op, &at("importing an enrollment")).await?;
                counts.enrollments += 1;
            }
            Line::Registration(record) => {
                // Replace what is there (its ETag is the precondition), or create.
                let get = StoreOp::GetRegistration { registration_id: record.registration_id.clone() };
                let expected = match run(store, get, &at("reading a registration")).await? {
                    StoreResult::Registration(Some(current)) => Some(current.etag),
                    _ => None,
                };
                let op = StoreOp::CommitRegistration { record, expected };
                run(store, op, &at("importing a registration")).await?;
                counts.registrations += 1;
            }
        }
    }
    Ok(counts)
}
