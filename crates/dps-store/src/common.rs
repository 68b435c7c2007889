//! Helpers shared by the backends: storage keys, precondition checks, paging.

use dps_core::proto::model::{AttestationType, EnrollmentGroup, IndividualEnrollment};
use dps_core::proto::query::Query;
use dps_core::proto::{Etag, IfMatch};
use dps_core::store::{StoreError, WriteCondition};
use serde::Serialize;

/// The storage key of an individual enrollment (its lowercase registration ID).
pub(crate) fn enrollment_key(e: &IndividualEnrollment) -> String {
    e.registration_id.to_ascii_lowercase()
}

/// The storage key of an enrollment group (its lowercase group ID).
pub(crate) fn group_key(g: &EnrollmentGroup) -> String {
    g.enrollment_group_id.to_ascii_lowercase()
}

/// Whether a group is a symmetric-key group (the ones [`dps_core::store::DeviceContext`] carries).
pub(crate) fn is_symmetric_key_group(g: &EnrollmentGroup) -> bool {
    g.attestation.kind == AttestationType::SymmetricKey
}

/// Refuses a write that would make the symmetric-key groups more than `limit`: a group becoming
/// symmetric-key (new, or changing attestation) while `count` of them exist. Replacing one that already is
/// never counts.
pub(crate) fn check_group_limit(
    group: &EnrollmentGroup,
    was_symmetric: bool,
    count: usize,
    limit: Option<usize>,
) -> Result<(), StoreError> {
    match limit {
        Some(limit) if is_symmetric_key_group(group) && !was_symmetric && count >= limit => {
            Err(StoreError::LimitReached { what: "symmetric-key enrollment groups".into(), limit })
        }
        _ => Ok(()),
    }
}

/// Refuses creating a CA certificate when `count` of them exist and the instance holds at most `limit`
/// (replacing one, `exists`, never counts).
pub(crate) fn check_certificate_limit(
    exists: bool,
    count: usize,
    limit: Option<usize>,
) -> Result<(), StoreError> {
    match limit {
        Some(limit) if !exists && count >= limit => {
            Err(StoreError::LimitReached { what: "CA certificates".into(), limit })
        }
        _ => Ok(()),
    }
}

/// Whether an enrollment or group whose stored `etag` string is `stored` satisfies `m`. The stored string
/// is parsed with [`Etag::parse`]; an item without a (valid) ETag only satisfies `*`.
pub(crate) fn item_matches(m: &IfMatch, stored: Option<&str>) -> bool {
    match m {
        IfMatch::Any => true,
        IfMatch::Etag(_) => {
            stored.and_then(|s| Etag::parse(s).ok()).is_some_and(|current| m.matches(&current))
        }
    }
}

/// Checks a write condition against the current item: `None` when absent, otherwise its stored ETag.
pub(crate) fn check_write(
    condition: &WriteCondition,
    existing: Option<Option<&str>>,
) -> Result<(), StoreError> {
    match (condition, existing) {
        (WriteCondition::Upsert, _) => Ok(()),
        (WriteCondition::CreateOnly, None) => Ok(()),
        (WriteCondition::CreateOnly, Some(_)) => Err(StoreError::AlreadyExists),
        (WriteCondition::IfMatch(_), None) => Err(StoreError::NotFound),
        (WriteCondition::IfMatch(m), Some(etag)) => {
            if item_matches(m, etag) {
                Ok(())
            } else {
                Err(StoreError::PreconditionFailed)
            }
        }
    }
}

/// Checks a delete precondition against the current item (see [`check_write`]).
pub(crate) fn check_delete(
    if_match: Option<&IfMatch>,
    existing: Option<Option<&str>>,
) -> Result<(), StoreError> {
    match (if_match, existing) {
        (_, None) => Err(StoreError::NotFound),
        (None, Some(_)) => Ok(()),
        (Some(m), Some(etag)) => {
            if item_matches(m, etag) {
                Ok(())
            } else {
                Err(StoreError::PreconditionFailed)
            }
        }
    }
}

/// The effective page size: at least one item.
pub(crate) fn page_limit(limit: usize) -> usize {
    limit.max(1)
}

/// Whether `item` passes `query` (serializing it only when the query has conditions).
pub(crate) fn query_matches<T: Serialize>(query: &Query, item: &T) -> Result<bool, StoreError> {
    if query.conditions.is_empty() {
        return Ok(true);
    }
    let value = serde_json::to_value(item).map_err(|e| json_error("serializing an item for a query", &e))?;
    Ok(query.matches(&value))
}

/// A `Backend` error for a JSON failure.
pub(crate) fn json_error(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Backend { message: format!("JSON error while {what}: {e}") }
}

/// A `Backend` error with a message.
pub(crate) fn backend(message: impl Into<String>) -> StoreError {
    StoreError::Backend { message: message.into() }
}

/// The stored ETag column as the item's `etag` (an empty column means the item had none).
pub(crate) fn non_empty(s: &str) -> Option<&str> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

/// Checks a put's condition against the stored `(etag, json)` and carries the stored creation time over.
pub(crate) fn prepare_put<T>(
    condition: &WriteCondition,
    existing: Option<(String, String)>,
    mut item: T,
    set_created: impl FnOnce(&mut T, String),
) -> Result<T, StoreError> {
    check_write(condition, existing.as_ref().map(|(etag, _)| non_empty(etag)))?;
    if let Some((_, json)) = existing {
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| json_error("reading the stored item's creation time", &e))?;
        if let Some(created) = value.get("createdDateTimeUtc").and_then(|v| v.as_str()) {
            set_created(&mut item, created.to_owned());
        }
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_conditions() {
        let m = IfMatch::parse("\"abc\"").unwrap();
        assert!(check_write(&WriteCondition::Upsert, None).is_ok());
        assert_eq!(
            check_write(&WriteCondition::CreateOnly, Some(Some("abc"))),
            Err(StoreError::AlreadyExists)
        );
        assert_eq!(check_write(&WriteCondition::IfMatch(m.clone()), None), Err(StoreError::NotFound));
        assert!(check_write(&WriteCondition::IfMatch(m.clone()), Some(Some("\"abc\""))).is_ok());
        assert_eq!(
            check_write(&WriteCondition::IfMatch(m.clone()), Some(Some("abd"))),
            Err(StoreError::PreconditionFailed)
        );
        // An item without an ETag satisfies only `*`.
        assert_eq!(check_write(&WriteCondition::IfMatch(m), Some(None)), Err(StoreError::PreconditionFailed));
        assert!(check_write(&WriteCondition::IfMatch(IfMatch::Any), Some(None)).is_ok());
    }

    #[test]
    fn delete_conditions_and_page_limit() {
        assert_eq!(check_delete(None, None), Err(StoreError::NotFound));
        assert!(check_delete(None, Some(Some("x"))).is_ok());
        assert_eq!(
            check_delete(Some(&IfMatch::parse("y").unwrap()), Some(Some("x"))),
            Err(StoreError::PreconditionFailed)
        );
        assert_eq!(page_limit(0), 1);
        assert_eq!(page_limit(7), 7);
    }
}
