//! Sealing the secrets of enrollments and groups inside their stored JSON (encryption at rest, see
//! [`dps_seal`]).
//!
//! The row keeps its JSON shape: each secret string (`attestation.symmetricKey.primaryKey` and
//! `secondaryKey`, `customAllocationDefinition.webhookUrl`) is replaced by its sealed form
//! (`sealed:v1:…`), bound to the table, the row's key and the field, so that it opens nowhere else. A
//! plain value (written before sealing was enabled) is read as it is and sealed on its next write.

use crate::common::{backend, enrollment_key, group_key};
use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::store::StoreError;
use dps_seal::{is_sealed, Sealer};

/// An item whose stored form has secret strings.
pub(crate) trait HasSecrets {
    /// The table the item is stored in (part of each secret's associated data).
    const TABLE: &'static str;
    /// The item's storage key.
    fn row_key(&self) -> String;
    /// Every secret string the item holds, by field name.
    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut String)>;
}

fn attestation_secrets<'a>(
    symmetric: Option<&'a mut dps_core::proto::model::SymmetricKeyAttestation>,
    custom: Option<&'a mut dps_core::proto::model::CustomAllocationDefinition>,
) -> Vec<(&'static str, &'a mut String)> {
    let mut out = Vec::new();
    if let Some(keys) = symmetric {
        if let Some(k) = keys.primary_key.as_mut() {
            out.push(("primaryKey", k));
        }
        if let Some(k) = keys.secondary_key.as_mut() {
            out.push(("secondaryKey", k));
        }
    }
    if let Some(custom) = custom {
        out.push(("webhookUrl", &mut custom.webhook_url));
    }
    out
}

impl HasSecrets for IndividualEnrollment {
    const TABLE: &'static str = "enrollments";
    fn row_key(&self) -> String {
        enrollment_key(self)
    }
    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        attestation_secrets(
            self.attestation.symmetric_key.as_mut(),
            self.custom_allocation_definition.as_mut(),
        )
    }
}

impl HasSecrets for EnrollmentGroup {
    const TABLE: &'static str = "enrollment_groups";
    fn row_key(&self) -> String {
        group_key(self)
    }
    fn secrets_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        attestation_secrets(
            self.attestation.symmetric_key.as_mut(),
            self.custom_allocation_definition.as_mut(),
        )
    }
}

/// Seals every secret of `item` in place (nothing without a sealer).
pub(crate) fn seal<T: HasSecrets>(sealer: Option<&Sealer>, item: &mut T) -> Result<(), StoreError> {
    let Some(sealer) = sealer else { return Ok(()) };
    let key = item.row_key();
    for (field, value) in item.secrets_mut() {
        if !is_sealed(value) {
            *value = sealer
                .seal_str(&[T::TABLE, &key, field], value)
                .map_err(|e| backend(format!("sealing {field} of {} '{key}': {e}", T::TABLE)))?;
        }
    }
    Ok(())
}

/// Opens every sealed secret of `item` in place; plain values stay as they are. A sealed value without a
/// sealer, or one that does not open (tampered with, or copied from another row), is an error.
pub(crate) fn open<T: HasSecrets>(sealer: Option<&Sealer>, item: &mut T) -> Result<(), StoreError> {
    if !item.secrets_mut().iter().any(|(_, value)| is_sealed(value)) {
        return Ok(());
    }
    let Some(sealer) = sealer else {
        return Err(backend(format!(
            "{} holds sealed secrets but the store was opened without encryption keys",
            T::TABLE
        )));
    };
    let key = item.row_key();
    for (field, value) in item.secrets_mut() {
        if is_sealed(value) {
            *value = sealer
                .open_str(&[T::TABLE, &key, field], value)
                .map_err(|e| backend(format!("reading {field} of {} '{key}': {e}", T::TABLE)))?;
        }
    }
    Ok(())
}

/// [`open`] over a list of items.
pub(crate) fn open_all<T: HasSecrets>(sealer: Option<&Sealer>, items: &mut [T]) -> Result<(), StoreError> {
    items.iter_mut().try_for_each(|item| open(sealer, item))
}
