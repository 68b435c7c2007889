//! Lowest-latency allocation (`geoLatency`, spec §8.2): the hub with the lowest latency to the device,
//! ties broken by the weighted hash, and plain hashing when nothing is known about the device's network.
//!
//! Azure measures latency from its regions; a self-hosted service learns it from a [`LatencySource`]: the
//! static [`LatencyTable`] (client networks in CIDR notation → latency to hubs, named by host name or by
//! the hub's `location`), or any live measurement an embedder keeps (the trait is a lookup; measuring is
//! the embedder's I/O, not this crate's).
//!
//! **Lookup rule of the table.** The most specific network containing the client address wins (longest
//! prefix, as in routing), so `10.0.0.0/8` can give defaults that `10.1.0.0/16` refines. Two entries for the
//! same network are refused when the table is built, as is a malformed network or a host part set beyond
//! the prefix (`10.1.2.3/16`), so a typo cannot silently change where devices go.

use crate::allocation::LinkedHub;
use dps_proto::{DpsError, ErrorCode};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Where latency figures come from.
pub trait LatencySource: std::fmt::Debug + Send + Sync {
    /// The latency in milliseconds from a client at `client` to `hub`, if known.
    fn latency_ms(&self, client: IpAddr, hub: &LinkedHub) -> Option<u32>;
}

/// An IP network: an address and a prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNetwork {
    address: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Parses `a.b.c.d/n` or `x:y::/n` (a bare address is a /32 or /128). The host part beyond the prefix
    /// must be zero.
    pub fn parse(s: &str) -> Result<IpNetwork, DpsError> {
        let bad = |why: &str| {
            DpsError::with_message(
                ErrorCode::BadRequest,
                format!(
                    "'{}' is not a network in CIDR notation: {why}",
                    s.chars().take(60).collect::<String>()
                ),
            )
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let address: IpAddr = addr.parse().map_err(|_| bad("the address is malformed"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(bad(&format!("the prefix length must be 0..={max}"))),
            },
        };
        let network = IpNetwork { address, prefix };
        if network.masked(address) != address {
            return Err(bad("bits are set beyond the prefix length (write the network address)"));
        }
        Ok(network)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.address.is_ipv4() && self.masked(ip) == self.address
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl std::fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// A static latency table: client networks → latency (ms) to hubs, each named by its host name or by
/// a `location` that hubs carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyTable {
    /// Most specific first.
    entries: Vec<(IpNetwork, BTreeMap<String, u32>)>,
}

impl LatencyTable {
    /// Builds a table from `(network, [(hub host name or location, ms)])` rows. Refuses a malformed network,
    /// the same network twice, an empty row, or a latency over 60 s.
    pub fn new<'a>(
        rows: impl IntoIterator<Item = (&'a str, Vec<(String, u32)>)>,
    ) -> Result<LatencyTable, DpsError> {
        let mut entries: Vec<(IpNetwork, BTreeMap<String, u32>)> = Vec::new();
        for (network, latencies) in rows {
            let net = IpNetwork::parse(network)?;
            if entries.iter().any(|(n, _)| *n == net) {
                return Err(DpsError::with_message(
                    ErrorCode::BadRequest,
                    format!("the latency table lists network {net} twice"),
                ));
            }
            if latencies.is_empty() {
                return Err(DpsError::with_message(
                    ErrorCode::BadRequest,
                    format!("the latency table's network {net} names no hub"),
                ));
            }
            let mut map = BTreeMap::new();
            for (name, ms) in latencies {
                if ms > 60_000 {
                    return Err(DpsError::with_message(
                        ErrorCode::BadRequest,
                        format!("latency {ms} ms from {net} to '{name}' is over 60000 ms"),
                    ));
                }
                map.insert(name.to_ascii_lowercase(), ms);
            }
            entries.push((net, map));
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.prefix));
        Ok(LatencyTable { entries })
    }

    /// The most specific row containing `client`: its network and latencies.
    pub fn row(&self, client: IpAddr) -> Option<(&IpNetwork, &BTreeMap<String, u32>)> {
        self.entries.iter().find(|(n, _)| n.contains(client)).map(|(n, m)| (n, m))
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl LatencySource for LatencyTable {
    fn latency_ms(&self, client: IpAddr, hub: &LinkedHub) -> Option<u32> {
        let (_, row) = self.row(client)?;
        row.get(&hub.host_name)
            .or_else(|| hub.location.as_ref().and_then(|l| row.get(&l.to_ascii_lowercase())))
            .copied()
    }
}

/// Picks the lowest-latency candidate for a client: among candidates with a known latency the lowest, ties
/// (equal lowest latency) broken by the weighted hash of [`crate::allocation`]; with no latency known for
/// any candidate, the weighted hash over all of them. Returns the hub and its latency (None: hashed).
pub fn lowest_latency<'a>(
    registration_id_key: &str,
    candidates: &[&'a LinkedHub],
    latency: impl Fn(&LinkedHub) -> Option<u32>,
) -> Result<(&'a LinkedHub, Option<u32>), DpsError> {
    let known: Vec<(&'a LinkedHub, u32)> =
        candidates.iter().filter_map(|h| latency(h).map(|l| (*h, l))).collect();
    let Some(best) = known.iter().map(|(_, l)| *l).min() else {
        return crate::allocation::allocate(
            dps_proto::model::AllocationPolicy::Hashed,
            registration_id_key,
            candidates,
        )
        .map(|h| (h, None));
    };
    let tied: Vec<&'a LinkedHub> = known.iter().filter(|(_, l)| *l == best).map(|(h, _)| *h).collect();
    let hub =
        crate::allocation::allocate(dps_proto::model::AllocationPolicy::Hashed, registration_id_key, &tied)?;
    Ok((hub, Some(best)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, location: Option<&str>) -> LinkedHub {
        let h = LinkedHub::new(name, None, None).unwrap();
        match location {
            Some(l) => h.with_location(l),
            None => h,
        }
    }

    fn table() -> LatencyTable {
        LatencyTable::new([
            ("10.0.0.0/8", vec![("westeurope".to_owned(), 30), ("eastus".to_owned(), 90)]),
            ("10.1.0.0/16", vec![("eastus".to_owned(), 10), ("westeurope".to_owned(), 80)]),
            ("2001:db8::/32", vec![("hub-eu.example.net".to_owned(), 5)]),
        ])
        .unwrap()
    }

    #[test]
    fn networks_parse_strictly_and_contain_their_addresses() {
        let n = IpNetwork::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped IPv6");
        assert!(IpNetwork::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert_eq!(IpNetwork::parse("192.0.2.7").unwrap().prefix(), 32);
        for bad in ["10.1.2.3/16", "10.0.0.0/33", "10.0.0/8", "nope/8", "10.0.0.0/-1", "", "::1/129"] {
            let e = IpNetwork::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad}");
            assert!(e.message.contains("CIDR"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn the_most_specific_network_wins_and_hubs_match_by_name_or_location() {
        let t = table();
        let eu = hub("hub-eu.example.net", Some("westeurope"));
        let us = hub("hub-us.example.net", Some("eastus"));
        assert_eq!(t.latency_ms("10.9.0.1".parse().unwrap(), &eu), Some(30));
        assert_eq!(t.latency_ms("10.1.0.1".parse().unwrap(), &eu), Some(80), "/16 refines /8");
        assert_eq!(t.latency_ms("10.1.0.1".parse().unwrap(), &us), Some(10));
        assert_eq!(t.latency_ms("2001:db8::1".parse().unwrap(), &eu), Some(5), "by host name");
        assert_eq!(t.latency_ms("192.0.2.1".parse().unwrap(), &eu), None, "unknown network");
    }

    #[test]
    fn overlapping_duplicates_empty_rows_and_absurd_latencies_are_refused() {
        let dup = LatencyTable::new([
            ("10.0.0.0/8", vec![("a".to_owned(), 1)]),
            ("10.0.0.0/8", vec![("b".to_owned(), 2)]),
        ]);
        assert!(dup.unwrap_err().message.contains("twice"));
        assert!(LatencyTable::new([("10.0.0.0/8", vec![])]).unwrap_err().message.contains("names no hub"));
        let slow = LatencyTable::new([("10.0.0.0/8", vec![("a".to_owned(), 60_001)])]);
        assert!(slow.unwrap_err().message.contains("60000"));
    }

    #[test]
    fn lowest_latency_wins_ties_hash_and_nothing_known_falls_back_to_hashing() {
        let t = table();
        let eu = hub("hub-eu.example.net", Some("westeurope"));
        let us = hub("hub-us.example.net", Some("eastus"));
        let far = hub("hub-ap.example.net", None);
        let candidates = [&eu, &us, &far];
        let from = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            lowest_latency("dev-1", &candidates, |h| t.latency_ms(ip, h)).unwrap()
        };
        assert_eq!(from("10.1.2.3").0.host_name, "hub-us.example.net");
        assert_eq!(from("10.1.2.3").1, Some(10));
        assert_eq!(from("10.200.0.1").0.host_name, "hub-eu.example.net");
        // Unknown network: exactly what hashed would choose.
        let hashed =
            crate::allocation::allocate(dps_proto::model::AllocationPolicy::Hashed, "dev-1", &candidates)
                .unwrap();
        assert_eq!(from("192.0.2.1"), (hashed, None));
        // A tie between two equally near hubs is broken by the hash over the tied ones only.
        let tie = LatencyTable::new([(
            "10.0.0.0/8",
            vec![("westeurope".to_owned(), 20), ("eastus".to_owned(), 20)],
        )])
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..64 {
            let id = format!("dev-{i}");
            let (h, l) =
                lowest_latency(&id, &candidates, |h| tie.latency_ms("10.0.0.1".parse().unwrap(), h)).unwrap();
            assert_eq!(l, Some(20));
            assert_ne!(h.host_name, "hub-ap.example.net", "an unmeasured hub never wins over measured ones");
            seen.insert(h.host_name.clone());
        }
        assert_eq!(seen.len(), 2, "ties spread over both near hubs");
    }
}
