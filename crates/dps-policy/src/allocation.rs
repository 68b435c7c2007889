//! Hub selection: which linked IoT hubs an enrollment may use (spec §8.1) and which one a built-in
//! allocation policy picks (spec §8.2).
//!
//! # The `hashed` scheme (frozen)
//!
//! `hashed` is weighted rendezvous (highest-random-weight) hashing. Device assignments depend on every
//! detail below, so **none of it may change between versions**; the test
//! `tests::hash_scheme_is_frozen` pins known values.
//!
//! For a registration ID `r` and a candidate hub with host name `h` and weight `w`:
//!
//! 1. `bytes = lower(r) ‖ 0xFF ‖ lower(h)`, where `lower` is ASCII lowercasing of the UTF-8 bytes. The
//!    separator byte `0xFF` never occurs in UTF-8, so distinct `(r, h)` pairs give distinct byte strings.
//! 2. `x = FNV-1a-64(bytes)` (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`, XOR then multiply,
//!    wrapping).
//! 3. `x = splitmix64_finalize(x)`: `x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27;
//!    x *= 0x94d049bb133111eb; x ^= x >> 31` (wrapping multiplications).
//! 4. `u = (2·(x >> 12) + 1) / 2^53`, an odd multiple of `2^-53`, so `u` is exactly representable and lies
//!    strictly inside `(0, 1)`.
//! 5. `score = w / -ln(u)`, where `ln` is [`deterministic_ln`]: a fixed sequence of IEEE-754 additions,
//!    multiplications and divisions (no platform `libm`), so the score is bit-for-bit the same on every
//!    platform.
//! 6. The candidate with the highest score wins; equal scores go to the lexicographically smallest
//!    lowercase host name. The result does not depend on the order of the candidates.
//!
//! Properties: the same registration ID always lands on the same hub while the candidate set is unchanged;
//! the probability of landing on a hub is `w / Σw`; adding a hub only moves devices *to* the new hub, and
//! removing a hub only moves the devices that were on it.

use dps_proto::model::AllocationPolicy;
use dps_proto::{DpsError, ErrorCode};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// The smallest allowed `allocationWeight` (spec §10.1).
pub const MIN_ALLOCATION_WEIGHT: u32 = 1;
/// The largest allowed `allocationWeight` (spec §10.1).
pub const MAX_ALLOCATION_WEIGHT: u32 = 1000;
/// The `allocationWeight` of a linked hub that does not set one.
pub const DEFAULT_ALLOCATION_WEIGHT: u32 = 1;
/// The longest accepted IoT hub host name (DNS limit).
pub const MAX_HOST_NAME_LEN: usize = 253;

/// An IoT hub linked to the provisioning service instance.
///
/// Built with [`LinkedHub::new`], which validates and lowercases the host name. Deserialization goes through
/// the same validation (`allocationWeight` and `applyAllocationPolicy` may be omitted).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "LinkedHubWire")]
pub struct LinkedHub {
    /// The hub's host name, lowercase (e.g. `hub-a.azure-devices.net`).
    pub host_name: String,
    /// Relative weight for `hashed` allocation, 1..=1000.
    pub allocation_weight: u32,
    /// Whether the hub takes part in automatic allocation. A hub with `false` is only used when an
    /// enrollment names it explicitly.
    pub apply_allocation_policy: bool,
    /// Where the hub runs (e.g. `westeurope`): the name a [`crate::latency::LatencyTable`] may use for it
    /// (lowest-latency allocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// The serialized form of a [`LinkedHub`] before validation.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LinkedHubWire {
    host_name: String,
    #[serde(default)]
    allocation_weight: Option<u32>,
    #[serde(default)]
    apply_allocation_policy: Option<bool>,
    #[serde(default)]
    location: Option<String>,
}

impl TryFrom<LinkedHubWire> for LinkedHub {
    type Error = DpsError;

    fn try_from(w: LinkedHubWire) -> Result<Self, DpsError> {
        let hub = LinkedHub::new(&w.host_name, w.allocation_weight, w.apply_allocation_policy)?;
        Ok(match w.location {
            Some(l) if !l.trim().is_empty() => hub.with_location(l.trim()),
            _ => hub,
        })
    }
}

impl LinkedHub {
    /// Validates a linked hub.
    ///
    /// - `host_name` is lowercased and must then be 1 to 253 characters of `a-z`, `0-9`, `-` and `.`;
    /// - `allocation_weight` defaults to 1 and must be in 1..=1000 (spec §10.1);
    /// - `apply_allocation_policy` defaults to `true`.
    ///
    /// Errors are [`ErrorCode::BadRequest`] with a message naming the problem.
    pub fn new(
        host_name: &str,
        allocation_weight: Option<u32>,
        apply_allocation_policy: Option<bool>,
    ) -> Result<Self, DpsError> {
        let host = host_name.to_ascii_lowercase();
        let shown: String = host_name.chars().take(80).collect();
        if host.is_empty() {
            return Err(DpsError::with_message(ErrorCode::BadRequest, "the IoT hub host name is empty"));
        }
        if host.len() > MAX_HOST_NAME_LEN {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the IoT hub host name '{shown}…' is longer than {MAX_HOST_NAME_LEN} characters"),
            ));
        }
        if !host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the IoT hub host name '{shown}' may contain only letters, digits, '-' and '.'"),
            ));
        }
        let weight = allocation_weight.unwrap_or(DEFAULT_ALLOCATION_WEIGHT);
        if !(MIN_ALLOCATION_WEIGHT..=MAX_ALLOCATION_WEIGHT).contains(&weight) {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!(
                    "allocationWeight {weight} of IoT hub '{host}' is out of range: it must be between \
                     {MIN_ALLOCATION_WEIGHT} and {MAX_ALLOCATION_WEIGHT}"
                ),
            ));
        }
        Ok(LinkedHub {
            host_name: host,
            allocation_weight: weight,
            apply_allocation_policy: apply_allocation_policy.unwrap_or(true),
            location: None,
        })
    }

    /// This hub with a location (e.g. `westeurope`), the name a latency table may use for it.
    #[must_use]
    pub fn with_location(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }

    /// Whether this hub has the given host name (ASCII case-insensitive).
    pub fn is_named(&self, host_name: &str) -> bool {
        self.host_name.eq_ignore_ascii_case(host_name)
    }
}

fn not_linked(host_name: &str, field: &str) -> DpsError {
    let shown: String = host_name.chars().take(253).collect();
    DpsError::with_message(
        ErrorCode::NoHubAvailable,
        format!(
            "IoT hub '{shown}' named in the enrollment's {field} is not linked to this provisioning service"
        ),
    )
}

/// The hubs an enrollment may be allocated to (spec §8.1).
///
/// 1. If `enrollment_iot_hubs` is a non-empty list, exactly the linked hubs it names (host names compared
///    case-insensitively; duplicates collapse). Explicit selection includes hubs whose
///    `apply_allocation_policy` is `false`. A listed hub that is not linked is an error.
/// 2. Else, if the deprecated `enrollment_iot_hub_host_name` is set (non-empty), that linked hub, by the
///    same rule.
/// 3. Else every linked hub with `apply_allocation_policy == true`.
///
/// The result keeps the order of `linked`. Errors are [`ErrorCode::NoHubAvailable`]: a named hub that is not
/// linked, or an empty result.
pub fn candidate_hubs<'a>(
    linked: &'a [LinkedHub],
    enrollment_iot_hubs: Option<&[String]>,
    enrollment_iot_hub_host_name: Option<&str>,
) -> Result<Vec<&'a LinkedHub>, DpsError> {
    let explicit: Option<(Vec<&str>, &str)> = match (enrollment_iot_hubs, enrollment_iot_hub_host_name) {
        (Some(list), _) if !list.is_empty() => Some((list.iter().map(String::as_str).collect(), "iotHubs")),
        (_, Some(single)) if !single.is_empty() => Some((vec![single], "iotHubHostName")),
        _ => None,
    };
    let selected: Vec<&LinkedHub> = match explicit {
        Some((names, field)) => {
            if let Some(missing) = names.iter().find(|n| !linked.iter().any(|h| h.is_named(n))) {
                return Err(not_linked(missing, field));
            }
            linked.iter().filter(|h| names.iter().any(|n| h.is_named(n))).collect()
        }
        None => linked.iter().filter(|h| h.apply_allocation_policy).collect(),
    };
    if selected.is_empty() {
        let why = if linked.is_empty() {
            "no IoT hub is linked to this provisioning service"
        } else {
            "no linked IoT hub takes part in automatic allocation (every linked hub has \
             applyAllocationPolicy=false) and the enrollment names none"
        };
        return Err(DpsError::with_message(ErrorCode::NoHubAvailable, why));
    }
    Ok(selected)
}

/// Picks the hub for a registration under a built-in policy (spec §8.2).
///
/// `registration_id_key` is the registration ID (its lowercase key, [`dps_proto::RegistrationId::key`];
/// it is lowercased again here, so the original spelling gives the same answer).
///
/// - [`AllocationPolicy::Hashed`]: weighted rendezvous hashing, see the [module docs](self) for the frozen
///   scheme.
/// - [`AllocationPolicy::GeoLatency`]: without latency data, exactly like `Hashed`; with it, use
///   [`crate::latency::lowest_latency`] (the engine does, when it knows the client's address and has a
///   [`crate::latency::LatencySource`]).
/// - [`AllocationPolicy::Static`]: the single candidate; zero or several candidates is
///   [`ErrorCode::NoHubAvailable`].
/// - [`AllocationPolicy::Custom`]: always [`ErrorCode::CustomAllocationFailed`]; custom allocation is decided
///   by the webhook (or an in-process hook), never by this function.
///
/// An empty candidate list is [`ErrorCode::NoHubAvailable`] for every built-in policy.
pub fn allocate<'a>(
    policy: AllocationPolicy,
    registration_id_key: &str,
    candidates: &[&'a LinkedHub],
) -> Result<&'a LinkedHub, DpsError> {
    match policy {
        AllocationPolicy::Hashed | AllocationPolicy::GeoLatency => hashed(registration_id_key, candidates),
        AllocationPolicy::Static => match candidates {
            [only] => Ok(only),
            _ => Err(DpsError::with_message(
                ErrorCode::NoHubAvailable,
                format!("static allocation needs exactly one IoT hub, but {} are eligible", candidates.len()),
            )),
        },
        AllocationPolicy::Custom => Err(DpsError::with_message(
            ErrorCode::CustomAllocationFailed,
            "custom allocation is decided by the allocation webhook (or hook), not by the built-in allocator",
        )),
    }
}

fn hashed<'a>(registration_id_key: &str, candidates: &[&'a LinkedHub]) -> Result<&'a LinkedHub, DpsError> {
    let mut best: Option<(&'a LinkedHub, f64, String)> = None;
    for &hub in candidates {
        let host = hub.host_name.to_ascii_lowercase();
        let score = rendezvous_score(registration_id_key, &host, hub.allocation_weight);
        let better = match &best {
            None => true,
            Some((_, best_score, best_host)) => match score.total_cmp(best_score) {
                Ordering::Greater => true,
                Ordering::Less => false,
                Ordering::Equal => host < *best_host,
            },
        };
        if better {
            best = Some((hub, score, host));
        }
    }
    best.map(|(hub, _, _)| hub).ok_or_else(|| {
        DpsError::with_message(ErrorCode::NoHubAvailable, "no IoT hub is eligible for this enrollment")
    })
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a_lower(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn splitmix64_finalize(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The frozen 64-bit hash of a (registration ID, host name) pair: steps 1–3 of the module docs.
pub fn rendezvous_hash(registration_id_key: &str, host_name: &str) -> u64 {
    let h = fnv1a_lower(FNV_OFFSET_BASIS, registration_id_key.as_bytes());
    let h = fnv1a_lower(h, &[0xFF]);
    splitmix64_finalize(fnv1a_lower(h, host_name.as_bytes()))
}

/// Maps a hash to `u = (2·(x >> 12) + 1) / 2^53`, strictly inside `(0, 1)` (step 4 of the module docs).
fn unit_interval(x: u64) -> f64 {
    const TWO_POW_53: f64 = 9_007_199_254_740_992.0;
    // (x >> 12) < 2^52, so the odd numerator is < 2^53 and converts to f64 exactly.
    (((x >> 12) << 1) | 1) as f64 / TWO_POW_53
}

/// The rendezvous score `weight / -ln(u)` of a hub for a registration ID (steps 1–5 of the module docs).
/// Higher wins. Always finite and non-negative.
pub fn rendezvous_score(registration_id_key: &str, host_name: &str, weight: u32) -> f64 {
    let u = unit_interval(rendezvous_hash(registration_id_key, host_name));
    f64::from(weight) / -deterministic_ln(u)
}

/// Natural logarithm of a positive, finite, normal `x`, computed only with IEEE-754 basic operations so the
/// result is identical on every platform (platform `ln` implementations may differ in the last bit).
///
/// `x = m·2^e` with `m` in `[√½, √2)`; `ln m = 2·atanh(s)` with `s = (m−1)/(m+1)`, `|s| ≤ 0.1716`, summed as
/// the odd series `2s·Σ s^(2k)/(2k+1)` for `k = 0..=13` (truncation error below `1e-20`); the result is
/// `e·ln 2 + ln m`. Accurate to a few ulps. Non-positive, subnormal or non-finite input returns NaN.
pub fn deterministic_ln(x: f64) -> f64 {
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    const LN_2: f64 = std::f64::consts::LN_2;
    if !(x.is_finite() && x.is_normal() && x > 0.0) {
        return f64::NAN;
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023_u64 << 52));
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut poly = 0.0_f64;
    for k in (0..=13_u32).rev() {
        poly = poly * z + 1.0 / f64::from(2 * k + 1);
    }
    e as f64 * LN_2 + 2.0 * s * poly
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn hub(name: &str, weight: u32) -> LinkedHub {
        LinkedHub::new(name, Some(weight), None).unwrap()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("device-{i:06}")).collect()
    }

    fn assign<'a>(id: &str, hubs: &'a [LinkedHub]) -> &'a str {
        let c: Vec<&LinkedHub> = hubs.iter().collect();
        &allocate(AllocationPolicy::Hashed, id, &c).unwrap().host_name
    }

    fn shares(hubs: &[LinkedHub], n: usize) -> HashMap<String, f64> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for id in ids(n) {
            *counts.entry(assign(&id, hubs).to_owned()).or_default() += 1;
        }
        counts.into_iter().map(|(k, v)| (k, v as f64 / n as f64)).collect()
    }

    #[test]
    fn linked_hub_defaults_and_validation() {
        let h = LinkedHub::new("Hub-A.Azure-Devices.NET", None, None).unwrap();
        assert_eq!(h.host_name, "hub-a.azure-devices.net");
        assert_eq!(h.allocation_weight, 1);
        assert!(h.apply_allocation_policy);
        assert!(h.is_named("HUB-A.azure-devices.net"));
        assert!(!LinkedHub::new("x", Some(7), Some(false)).unwrap().apply_allocation_policy);
        assert_eq!(LinkedHub::new("x", Some(1000), None).unwrap().allocation_weight, 1000);
        for (name, weight) in [
            ("", None),
            ("hub a.net", None),
            ("hub_a.net", None),
            ("hüb.net", None),
            ("hub.net", Some(0)),
            ("hub.net", Some(1001)),
        ] {
            let err = LinkedHub::new(name, weight, None).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{name:?} {weight:?}");
            assert!(!err.message.is_empty());
        }
        assert!(LinkedHub::new(&"a".repeat(253), None, None).is_ok());
        assert_eq!(LinkedHub::new(&"a".repeat(254), None, None).unwrap_err().code, ErrorCode::BadRequest);
        let err = LinkedHub::new("hub.net", Some(0), None).unwrap_err();
        assert!(err.message.contains("allocationWeight"), "{}", err.message);
    }

    #[test]
    fn linked_hub_serde_is_camel_case_and_validated() {
        let h: LinkedHub = serde_json::from_str(r#"{"hostName":"HUB.example.net"}"#).unwrap();
        assert_eq!(h, LinkedHub::new("hub.example.net", None, None).unwrap());
        let json = serde_json::to_value(LinkedHub::new("h.net", Some(5), Some(false)).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"hostName":"h.net","allocationWeight":5,"applyAllocationPolicy":false})
        );
        let back: LinkedHub = serde_json::from_value(json).unwrap();
        assert_eq!(back.allocation_weight, 5);
        assert!(serde_json::from_str::<LinkedHub>(r#"{"hostName":"h.net","allocationWeight":0}"#).is_err());
        assert!(serde_json::from_str::<LinkedHub>(r#"{"hostName":""}"#).is_err());
    }

    #[test]
    fn hash_scheme_is_frozen() {
        // FNV-1a 64 of the empty string is the offset basis; of "a" is a published test vector.
        assert_eq!(fnv1a_lower(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_lower(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        // splitmix64's first output from seed 0 (state advanced by the golden gamma) is 0xe220a8397b1dcdaf.
        assert_eq!(splitmix64_finalize(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        // Case-insensitive in both inputs.
        assert_eq!(rendezvous_hash("Device-1", "HUB.net"), rendezvous_hash("device-1", "hub.net"));
        // The separator keeps (r, h) pairs apart.
        assert_ne!(rendezvous_hash("ab", "c"), rendezvous_hash("a", "bc"));
        // Pinned values: if these change, every hashed assignment in every deployment changes.
        assert_eq!(rendezvous_hash("device-1", "hub-a.azure-devices.net"), PINNED_HASH);
        let score = rendezvous_score("device-1", "hub-a.azure-devices.net", 1);
        assert!((score - 3.501_191_813_948_122).abs() < 1e-12, "{score}");
        assert_eq!(score.to_bits(), PINNED_SCORE_BITS, "{:#x}", score.to_bits());
        let hubs = [
            hub("hub-a.azure-devices.net", 1),
            hub("hub-b.azure-devices.net", 2),
            hub("hub-c.azure-devices.net", 7),
        ];
        let got: Vec<&str> = ["device-1", "device-2", "device-3", "device-4", "device-5", "device-6"]
            .iter()
            .map(|id| assign(id, &hubs))
            .collect();
        assert_eq!(got, PINNED_ASSIGNMENTS);
    }

    const PINNED_HASH: u64 = 0xc065_9b1f_28e6_5714;
    const PINNED_SCORE_BITS: u64 = 0x400c_0270_da8f_70da;
    const PINNED_ASSIGNMENTS: [&str; 6] = [
        "hub-c.azure-devices.net",
        "hub-c.azure-devices.net",
        "hub-b.azure-devices.net",
        "hub-c.azure-devices.net",
        "hub-c.azure-devices.net",
        "hub-b.azure-devices.net",
    ];

    #[test]
    fn unit_interval_is_open() {
        assert!(unit_interval(0) > 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
        assert_eq!(unit_interval(0), 1.0 / 9_007_199_254_740_992.0);
        assert_eq!(unit_interval(u64::MAX), 1.0 - 1.0 / 9_007_199_254_740_992.0);
        assert!(rendezvous_score("x", "h", 1).is_finite());
        assert!(deterministic_ln(unit_interval(u64::MAX)) < 0.0);
    }

    #[test]
    fn deterministic_ln_matches_std() {
        let mut samples = vec![1.0, 0.5, 2.0, std::f64::consts::E, 1e-300, 1e300, 0.999_999_999, 1.000_000_1];
        samples.extend((0..2000_u64).map(|i| unit_interval(splitmix64_finalize(i))));
        samples.push(unit_interval(0));
        samples.push(unit_interval(u64::MAX));
        for x in samples {
            let (ours, std) = (deterministic_ln(x), x.ln());
            let tol = 4.0 * f64::EPSILON * std.abs().max(f64::MIN_POSITIVE);
            assert!((ours - std).abs() <= tol, "ln({x}) = {ours}, std {std}");
        }
        assert_eq!(deterministic_ln(1.0), 0.0);
        assert!(deterministic_ln(0.0).is_nan());
        assert!(deterministic_ln(-1.0).is_nan());
        assert!(deterministic_ln(f64::INFINITY).is_nan());
        assert!(deterministic_ln(f64::NAN).is_nan());
    }

    #[test]
    fn hashed_is_deterministic_and_order_independent() {
        let hubs = vec![hub("a.net", 3), hub("b.net", 1), hub("c.net", 5), hub("d.net", 2)];
        let mut reversed = hubs.clone();
        reversed.reverse();
        for id in ids(500) {
            let first = assign(&id, &hubs);
            assert_eq!(first, assign(&id, &hubs));
            assert_eq!(first, assign(&id, &reversed));
            assert_eq!(
                first,
                assign(&id.to_ascii_uppercase(), &hubs),
                "registration IDs are case-insensitive"
            );
        }
    }

    #[test]
    fn hashed_follows_weights() {
        let hubs = vec![hub("hub-1.net", 1), hub("hub-2.net", 2), hub("hub-7.net", 7)];
        let s = shares(&hubs, 20_000);
        for (name, want) in [("hub-1.net", 0.10), ("hub-2.net", 0.20), ("hub-7.net", 0.70)] {
            let got = s.get(name).copied().unwrap_or(0.0);
            assert!((got - want).abs() < 0.02, "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn equal_weights_are_even() {
        let hubs: Vec<LinkedHub> = (0..5).map(|i| hub(&format!("hub-{i}.azure-devices.net"), 1)).collect();
        let s = shares(&hubs, 20_000);
        assert_eq!(s.len(), 5);
        for (name, got) in s {
            assert!((got - 0.2).abs() < 0.02, "{name}: {got}");
        }
    }

    #[test]
    fn adding_a_hub_only_moves_devices_to_it() {
        let old = vec![hub("a.net", 1), hub("b.net", 2), hub("c.net", 3)];
        let mut new = old.clone();
        new.push(hub("d.net", 4));
        let n = 20_000;
        let mut moved = 0;
        for id in ids(n) {
            let (before, after) = (assign(&id, &old), assign(&id, &new));
            if before != after {
                assert_eq!(after, "d.net", "{id} moved between old hubs: {before} -> {after}");
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.4).abs() < 0.02, "new hub took {share}, fair share 0.4");
    }

    #[test]
    fn removing_a_hub_only_moves_its_devices() {
        let old = vec![hub("a.net", 1), hub("b.net", 1), hub("c.net", 1), hub("d.net", 1)];
        let new: Vec<LinkedHub> = old.iter().filter(|h| h.host_name != "b.net").cloned().collect();
        for id in ids(5_000) {
            let (before, after) = (assign(&id, &old), assign(&id, &new));
            if before != "b.net" {
                assert_eq!(before, after, "{id} was not on the removed hub but moved");
            }
        }
    }

    #[test]
    fn geo_latency_falls_back_to_hashed() {
        let hubs = [hub("a.net", 1), hub("b.net", 4)];
        let c: Vec<&LinkedHub> = hubs.iter().collect();
        for id in ids(200) {
            assert_eq!(
                allocate(AllocationPolicy::GeoLatency, &id, &c).unwrap(),
                allocate(AllocationPolicy::Hashed, &id, &c).unwrap()
            );
        }
    }

    #[test]
    fn static_needs_exactly_one() {
        let hubs = [hub("a.net", 1), hub("b.net", 1)];
        assert_eq!(allocate(AllocationPolicy::Static, "d", &[]).unwrap_err().code, ErrorCode::NoHubAvailable);
        assert_eq!(allocate(AllocationPolicy::Static, "d", &[&hubs[1]]).unwrap().host_name, "b.net");
        let err = allocate(AllocationPolicy::Static, "d", &[&hubs[0], &hubs[1]]).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoHubAvailable);
        assert!(err.message.contains("exactly one"), "{}", err.message);
    }

    #[test]
    fn empty_candidates_and_custom() {
        for p in [AllocationPolicy::Hashed, AllocationPolicy::GeoLatency] {
            assert_eq!(allocate(p, "d", &[]).unwrap_err().code, ErrorCode::NoHubAvailable);
        }
        let hubs = [hub("a.net", 1)];
        let err = allocate(AllocationPolicy::Custom, "d", &[&hubs[0]]).unwrap_err();
        assert_eq!(err.code, ErrorCode::CustomAllocationFailed);
        assert!(err.message.contains("webhook"));
    }

    #[test]
    fn ties_go_to_smallest_host_name() {
        // Duplicate host names tie exactly; either copy is the same hub. Weight-0 hubs (only constructible
        // directly) all score 0 and tie: the smallest host name wins regardless of order.
        let zero = |n: &str| LinkedHub {
            host_name: n.into(),
            allocation_weight: 0,
            apply_allocation_policy: true,
            location: None,
        };
        let (b, a) = (zero("b.net"), zero("a.net"));
        assert_eq!(allocate(AllocationPolicy::Hashed, "d", &[&b, &a]).unwrap().host_name, "a.net");
        assert_eq!(allocate(AllocationPolicy::Hashed, "d", &[&a, &b]).unwrap().host_name, "a.net");
    }

    fn linked() -> Vec<LinkedHub> {
        vec![
            LinkedHub::new("a.net", None, None).unwrap(),
            LinkedHub::new("b.net", None, Some(false)).unwrap(),
            LinkedHub::new("c.net", None, None).unwrap(),
        ]
    }

    fn names(v: &[&LinkedHub]) -> Vec<String> {
        v.iter().map(|h| h.host_name.clone()).collect()
    }

    #[test]
    fn candidates_default_to_participating_hubs() {
        let l = linked();
        assert_eq!(names(&candidate_hubs(&l, None, None).unwrap()), ["a.net", "c.net"]);
        assert_eq!(names(&candidate_hubs(&l, Some(&[]), None).unwrap()), ["a.net", "c.net"]);
        assert_eq!(names(&candidate_hubs(&l, Some(&[]), Some("")).unwrap()), ["a.net", "c.net"]);
    }

    #[test]
    fn candidates_from_iot_hubs_list() {
        let l = linked();
        let list = vec!["C.NET".to_owned(), "b.net".to_owned(), "c.net".to_owned()];
        // Explicit selection includes b.net although it does not take part in automatic allocation; the
        // result follows the linked order and has no duplicates. iotHubs wins over iotHubHostName.
        assert_eq!(names(&candidate_hubs(&l, Some(&list), Some("a.net")).unwrap()), ["b.net", "c.net"]);
        assert_eq!(names(&candidate_hubs(&l, Some(&["B.Net".to_owned()]), None).unwrap()), ["b.net"]);
        let err = candidate_hubs(&l, Some(&["a.net".to_owned(), "zzz.net".to_owned()]), None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoHubAvailable);
        assert!(err.message.contains("zzz.net") && err.message.contains("iotHubs"), "{}", err.message);
    }

    #[test]
    fn candidates_from_deprecated_host_name() {
        let l = linked();
        assert_eq!(names(&candidate_hubs(&l, None, Some("A.NET")).unwrap()), ["a.net"]);
        assert_eq!(names(&candidate_hubs(&l, Some(&[]), Some("b.net")).unwrap()), ["b.net"]);
        let err = candidate_hubs(&l, None, Some("gone.net")).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoHubAvailable);
        assert!(
            err.message.contains("gone.net") && err.message.contains("iotHubHostName"),
            "{}",
            err.message
        );
    }

    #[test]
    fn candidates_empty_is_an_error() {
        let err = candidate_hubs(&[], None, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoHubAvailable);
        assert!(err.message.contains("no IoT hub is linked"), "{}", err.message);
        let l = vec![LinkedHub::new("a.net", None, Some(false)).unwrap()];
        let err = candidate_hubs(&l, None, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoHubAvailable);
        assert!(err.message.contains("applyAllocationPolicy"), "{}", err.message);
        assert_eq!(
            candidate_hubs(&[], Some(&["a.net".to_owned()]), None).unwrap_err().code,
            ErrorCode::NoHubAvailable
        );
    }

    fn arb_policy() -> impl Strategy<Value = AllocationPolicy> {
        prop_oneof![
            Just(AllocationPolicy::Hashed),
            Just(AllocationPolicy::GeoLatency),
            Just(AllocationPolicy::Static),
            Just(AllocationPolicy::Custom),
        ]
    }

    proptest! {
        #[test]
        fn allocate_never_panics_and_returns_a_candidate(
            policy in arb_policy(),
            id in ".{0,64}",
            hubs in proptest::collection::vec(("[a-z0-9.-]{1,20}", any::<u32>(), any::<bool>()), 0..8),
        ) {
            let hubs: Vec<LinkedHub> = hubs
                .into_iter()
                .map(|(host_name, allocation_weight, apply_allocation_policy)| LinkedHub {
                    host_name,
                    allocation_weight,
                    apply_allocation_policy,
                    location: None,
                })
                .collect();
            let c: Vec<&LinkedHub> = hubs.iter().collect();
            match allocate(policy, &id, &c) {
                Ok(chosen) => prop_assert!(c.iter().any(|h| std::ptr::eq(*h, chosen))),
                Err(e) => prop_assert!(
                    matches!(e.code, ErrorCode::NoHubAvailable | ErrorCode::CustomAllocationFailed),
                    "{e}"
                ),
            }
            if !c.is_empty() && matches!(policy, AllocationPolicy::Hashed | AllocationPolicy::GeoLatency) {
                prop_assert!(allocate(policy, &id, &c).is_ok());
            }
        }

        #[test]
        fn scores_are_finite_and_non_negative(id in ".{0,64}", host in "[a-z0-9.-]{1,40}", w in any::<u32>()) {
            let s = rendezvous_score(&id, &host, w);
            prop_assert!(s.is_finite() && s >= 0.0);
        }
    }
}
