//! What happens when a device registers again: the reprovisioning decision table (spec §9.2, §9.4).
//!
//! [`plan`] takes the device's current location (if any), the enrollment's `reprovisionPolicy`, the device
//! API version and the device ID the device should have, and says where the device goes, which twin it
//! gets there, which identity to delete and which substatus to report. Allocation is passed in as a closure
//! and only called when the policy runs allocation.
//!
//! **Effective policy.** An enrollment without `reprovisionPolicy` registered through a legacy device API
//! version (≤ 2018-04-01, [`ApiVersion::is_legacy`]) gets the pre-September-2018 "sticky" behaviour, i.e.
//! never re-provision (§9.4). Otherwise a missing policy means the default `{updateHubAssignment: true,
//! migrateDeviceData: true}`. A policy that is set always wins, whatever the api-version.
//!
//! **Same location** means the same hub (host names compared case-insensitively) *and* the same device ID
//! (compared exactly; device IDs are case-sensitive).
//!
//! **"Reprovisioned" substatus** (`R` below) is `reprovisionedToInitialAssignment` when the api-version
//! reports it (≥ 2019-04-15, [`ApiVersion::reports_reprovisioned_substatus`]), else `initialAssignment`.
//!
//! | previous | effective policy (update, migrate) | allocation | same location? | target hub | twin | delete previous | substatus |
//! |---|---|---|---|---|---|---|---|
//! | none | any | run | – | allocated | `Initial` | no | `initialAssignment` |
//! | some | never (false, _) | **not run** | yes | previous hub | `Keep` | no | `R` |
//! | some | never (false, _) | **not run** | no (device ID changed) | previous hub | `MigrateFrom(previous)` | yes | `deviceDataMigrated` |
//! | some | migrate (true, true) | run | yes | allocated | `Keep` | no | `R` |
//! | some | migrate (true, true) | run | no | allocated | `MigrateFrom(previous)` | yes | `deviceDataMigrated` |
//! | some | reset (true, false) | run | yes | allocated | `Initial` ("factory reset") | no | `deviceDataReset` |
//! | some | reset (true, false) | run | no | allocated | `Initial` | yes | `deviceDataReset` |
//!
//! The target device ID is always the `device_id` argument. Errors returned by the allocation closure are
//! returned unchanged.
//!
//! Reset applies even when the location does not change, as the newest Azure docs describe (older docs
//! applied it only on a hub change; spec §9.2).

use dps_proto::model::{RegistrationSubstatus, ReprovisionPolicy};
use dps_proto::{ApiVersion, DpsError};

/// Where a device identity lives: an IoT hub and the device ID in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    /// The hub's host name.
    pub hub: String,
    /// The device ID in that hub (case-sensitive).
    pub device_id: String,
}

impl Assignment {
    /// An assignment of `device_id` to `hub`.
    pub fn new(hub: impl Into<String>, device_id: impl Into<String>) -> Self {
        Assignment { hub: hub.into(), device_id: device_id.into() }
    }

    /// Whether both name the same location: same hub (case-insensitive) and same device ID (exact).
    pub fn same_location(&self, other: &Assignment) -> bool {
        self.hub.eq_ignore_ascii_case(&other.hub) && self.device_id == other.device_id
    }
}

/// Which twin (and capabilities) the device identity gets on the target hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinSource {
    /// The enrollment's initial twin (or the custom webhook's `initialTwin`).
    Initial,
    /// Keep the twin the identity already has on the target hub; only the identity (credentials,
    /// capabilities) is updated.
    Keep,
    /// Read the twin and capabilities from this previous location and write them to the target.
    MigrateFrom(Assignment),
}

/// The outcome of [`plan`]: what the engine must do in the hubs and report to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReprovisionPlan {
    /// Where the device identity goes.
    pub target: Assignment,
    /// The substatus to report.
    pub substatus: RegistrationSubstatus,
    /// Which twin the identity gets on the target hub.
    pub twin: TwinSource,
    /// An identity to delete after the target is written (the previous location, when it changed and the
    /// policy moves the device).
    pub delete_previous: Option<Assignment>,
    /// Whether the allocation closure was called.
    pub ran_allocation: bool,
}

/// The reprovisioning policy that applies (spec §9.4): a set policy wins; without one, legacy api-versions
/// never re-provision and newer ones use the default (update and migrate).
pub fn effective_policy(policy: Option<ReprovisionPolicy>, api_version: &ApiVersion) -> ReprovisionPolicy {
    match policy {
        Some(p) => p,
        None if api_version.is_legacy() => {
            ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: true }
        }
        None => ReprovisionPolicy::default(),
    }
}

/// Decides a (re-)registration; see the [module docs](self) for the table.
///
/// `allocate` returns the host name chosen by the enrollment's allocation policy; it is called at most once,
/// and not at all under never-reprovision.
pub fn plan(
    previous: Option<&Assignment>,
    policy: Option<ReprovisionPolicy>,
    api_version: &ApiVersion,
    device_id: &str,
    allocate: impl FnOnce() -> Result<String, DpsError>,
) -> Result<ReprovisionPlan, DpsError> {
    let Some(previous) = previous else {
        return Ok(ReprovisionPlan {
            target: Assignment::new(allocate()?, device_id),
            substatus: RegistrationSubstatus::InitialAssignment,
            twin: TwinSource::Initial,
            delete_previous: None,
            ran_allocation: true,
        });
    };
    let reprovisioned = if api_version.reports_reprovisioned_substatus() {
        RegistrationSubstatus::ReprovisionedToInitialAssignment
    } else {
        RegistrationSubstatus::InitialAssignment
    };
    let policy = effective_policy(policy, api_version);
    let (target, ran_allocation) = if policy.update_hub_assignment {
        (Assignment::new(allocate()?, device_id), true)
    } else {
        (Assignment::new(previous.hub.clone(), device_id), false)
    };
    let moved = !target.same_location(previous);
    let (twin, substatus) = match (policy.update_hub_assignment, policy.migrate_device_data, moved) {
        (true, false, _) => (TwinSource::Initial, RegistrationSubstatus::DeviceDataReset),
        (_, _, false) => (TwinSource::Keep, reprovisioned),
        (_, _, true) => {
            (TwinSource::MigrateFrom(previous.clone()), RegistrationSubstatus::DeviceDataMigrated)
        }
    };
    Ok(ReprovisionPlan {
        target,
        substatus,
        twin,
        delete_previous: moved.then(|| previous.clone()),
        ran_allocation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_proto::ErrorCode;
    use std::cell::Cell;

    use RegistrationSubstatus::{
        DeviceDataMigrated, DeviceDataReset, InitialAssignment, ReprovisionedToInitialAssignment,
    };

    const NEVER: ReprovisionPolicy =
        ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: true };
    const NEVER_NO_MIGRATE: ReprovisionPolicy =
        ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: false };
    const MIGRATE: ReprovisionPolicy =
        ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true };
    const RESET: ReprovisionPolicy =
        ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: false };

    fn legacy() -> ApiVersion {
        ApiVersion::V2018_04_01
    }
    /// 2019-03-31: modern (not legacy) but before 2019-04-15, so still reports `initialAssignment`.
    fn middle() -> ApiVersion {
        ApiVersion::V2019_03_31
    }
    fn modern() -> ApiVersion {
        ApiVersion::V2021_06_01
    }

    /// Runs `plan` with an allocator that returns `allocated` and counts its calls.
    fn run(
        previous: Option<&Assignment>,
        policy: Option<ReprovisionPolicy>,
        api: &ApiVersion,
        device_id: &str,
        allocated: &str,
    ) -> (ReprovisionPlan, u32) {
        let calls = Cell::new(0);
        let p = plan(previous, policy, api, device_id, || {
            calls.set(calls.get() + 1);
            Ok(allocated.to_owned())
        })
        .unwrap();
        assert_eq!(p.ran_allocation, calls.get() == 1);
        assert!(calls.get() <= 1);
        (p, calls.get())
    }

    fn prev() -> Assignment {
        Assignment::new("hub-a.net", "dev-1")
    }

    #[test]
    fn first_registration_is_initial_assignment() {
        for api in [legacy(), middle(), modern()] {
            for policy in [None, Some(NEVER), Some(NEVER_NO_MIGRATE), Some(MIGRATE), Some(RESET)] {
                let (p, calls) = run(None, policy, &api, "dev-1", "hub-b.net");
                assert_eq!(calls, 1, "{api} {policy:?}");
                assert_eq!(
                    p,
                    ReprovisionPlan {
                        target: Assignment::new("hub-b.net", "dev-1"),
                        substatus: InitialAssignment,
                        twin: TwinSource::Initial,
                        delete_previous: None,
                        ran_allocation: true,
                    }
                );
            }
        }
    }

    #[test]
    fn effective_policy_rules() {
        assert_eq!(effective_policy(None, &legacy()), NEVER);
        assert_eq!(effective_policy(None, &ApiVersion::V2017_11_15), NEVER);
        assert_eq!(effective_policy(None, &middle()), MIGRATE);
        assert_eq!(effective_policy(None, &modern()), MIGRATE);
        for api in [legacy(), middle(), modern()] {
            for p in [NEVER, NEVER_NO_MIGRATE, MIGRATE, RESET] {
                assert_eq!(effective_policy(Some(p), &api), p);
            }
        }
    }

    /// The whole table: every effective policy × same/different hub × same/different device ID × api version
    /// × policy given or defaulted.
    #[test]
    fn decision_table() {
        let cases: Vec<(Option<ReprovisionPolicy>, ApiVersion)> = vec![
            (None, legacy()),
            (None, middle()),
            (None, modern()),
            (Some(NEVER), legacy()),
            (Some(NEVER), middle()),
            (Some(NEVER), modern()),
            (Some(NEVER_NO_MIGRATE), modern()),
            (Some(MIGRATE), legacy()),
            (Some(MIGRATE), middle()),
            (Some(MIGRATE), modern()),
            (Some(RESET), legacy()),
            (Some(RESET), middle()),
            (Some(RESET), modern()),
        ];
        // (allocated hub, device ID): same location; same hub other case; other hub; same hub new device ID;
        // other hub new device ID.
        let moves = [
            ("hub-a.net", "dev-1"),
            ("HUB-A.NET", "dev-1"),
            ("hub-b.net", "dev-1"),
            ("hub-a.net", "dev-2"),
            ("hub-b.net", "dev-2"),
        ];
        for (policy, api) in &cases {
            let eff = effective_policy(*policy, api);
            let r = if api.reports_reprovisioned_substatus() {
                ReprovisionedToInitialAssignment
            } else {
                InitialAssignment
            };
            for (allocated, device_id) in moves {
                let previous = prev();
                let (p, calls) = run(Some(&previous), *policy, api, device_id, allocated);
                let ctx = format!("{policy:?} {api} -> ({allocated}, {device_id})");
                assert_eq!(p.target.device_id, device_id, "{ctx}");
                if !eff.update_hub_assignment {
                    // Never re-provision: no allocation, stays on the previous hub.
                    assert_eq!(calls, 0, "{ctx}");
                    assert_eq!(p.target.hub, "hub-a.net", "{ctx}");
                    if device_id == "dev-1" {
                        assert_eq!(
                            (p.twin.clone(), p.substatus, p.delete_previous.clone()),
                            (TwinSource::Keep, r, None),
                            "{ctx}"
                        );
                    } else {
                        assert_eq!(p.twin, TwinSource::MigrateFrom(previous.clone()), "{ctx}");
                        assert_eq!(p.substatus, DeviceDataMigrated, "{ctx}");
                        assert_eq!(p.delete_previous, Some(previous.clone()), "{ctx}");
                    }
                    continue;
                }
                assert_eq!(calls, 1, "{ctx}");
                assert_eq!(p.target.hub, allocated, "{ctx}");
                let same = allocated.eq_ignore_ascii_case("hub-a.net") && device_id == "dev-1";
                assert_eq!(p.delete_previous, (!same).then(|| previous.clone()), "{ctx}");
                if eff.migrate_device_data {
                    if same {
                        assert_eq!((p.twin.clone(), p.substatus), (TwinSource::Keep, r), "{ctx}");
                    } else {
                        assert_eq!(p.twin, TwinSource::MigrateFrom(previous.clone()), "{ctx}");
                        assert_eq!(p.substatus, DeviceDataMigrated, "{ctx}");
                    }
                } else {
                    assert_eq!(
                        (p.twin.clone(), p.substatus),
                        (TwinSource::Initial, DeviceDataReset),
                        "{ctx}"
                    );
                }
            }
        }
    }

    #[test]
    fn legacy_without_policy_is_sticky() {
        let previous = prev();
        let (p, calls) = run(Some(&previous), None, &legacy(), "dev-1", "hub-b.net");
        assert_eq!(calls, 0);
        assert_eq!(
            p,
            ReprovisionPlan {
                target: previous.clone(),
                substatus: InitialAssignment,
                twin: TwinSource::Keep,
                delete_previous: None,
                ran_allocation: false,
            }
        );
        // A set policy takes precedence over the legacy behaviour.
        let (p, calls) = run(Some(&previous), Some(MIGRATE), &legacy(), "dev-1", "hub-b.net");
        assert_eq!(calls, 1);
        assert_eq!(p.target.hub, "hub-b.net");
        assert_eq!(p.substatus, DeviceDataMigrated);
    }

    #[test]
    fn modern_default_migrates() {
        let previous = prev();
        let (p, _) = run(Some(&previous), None, &modern(), "dev-1", "hub-b.net");
        assert_eq!(
            p,
            ReprovisionPlan {
                target: Assignment::new("hub-b.net", "dev-1"),
                substatus: DeviceDataMigrated,
                twin: TwinSource::MigrateFrom(previous.clone()),
                delete_previous: Some(previous.clone()),
                ran_allocation: true,
            }
        );
        let (p, _) = run(Some(&previous), None, &modern(), "dev-1", "hub-a.net");
        assert_eq!(p.substatus, ReprovisionedToInitialAssignment);
        assert_eq!(p.twin, TwinSource::Keep);
        let (p, _) = run(Some(&previous), None, &middle(), "dev-1", "hub-a.net");
        assert_eq!(p.substatus, InitialAssignment);
    }

    #[test]
    fn reset_on_same_hub_is_a_factory_reset() {
        let previous = prev();
        let (p, _) = run(Some(&previous), Some(RESET), &modern(), "dev-1", "Hub-A.net");
        assert_eq!(p.twin, TwinSource::Initial);
        assert_eq!(p.substatus, DeviceDataReset);
        assert_eq!(p.delete_previous, None);
    }

    #[test]
    fn device_id_is_case_sensitive() {
        let previous = prev();
        let (p, _) = run(Some(&previous), Some(MIGRATE), &modern(), "DEV-1", "hub-a.net");
        assert_eq!(p.twin, TwinSource::MigrateFrom(previous.clone()));
        assert_eq!(p.delete_previous, Some(previous));
        assert!(Assignment::new("H.net", "d").same_location(&Assignment::new("h.NET", "d")));
        assert!(!Assignment::new("h.net", "d").same_location(&Assignment::new("h.net", "D")));
    }

    #[test]
    fn allocation_errors_propagate() {
        let previous = prev();
        let fail = || Err(DpsError::with_message(ErrorCode::NoHubAvailable, "none"));
        for (prev, policy) in [(None, None), (Some(&previous), Some(MIGRATE)), (Some(&previous), Some(RESET))]
        {
            let err = plan(prev, policy, &modern(), "dev-1", fail).unwrap_err();
            assert_eq!(err.code, ErrorCode::NoHubAvailable);
            assert_eq!(err.message, "none");
        }
        // Never re-provision does not allocate, so a failing allocator does not matter.
        let p = plan(Some(&previous), Some(NEVER), &modern(), "dev-1", fail).unwrap();
        assert_eq!(p.target, previous);
        assert!(!p.ran_allocation);
    }
}
