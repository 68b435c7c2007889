//! The per-address limiter of failed device authentications (401 storms).
//!
//! Every device-API request (HTTPS, MQTT, MQTT over WebSocket) answered with a `401xxx` takes one token from
//! its client address's bucket. A bucket holds at most `burst` tokens and refills at
//! `max_auth_failures_per_address_per_minute`. While an address's bucket is empty, every further device-API
//! request from it is answered `429` / `429001` with a `Retry-After` (HTTPS, and `res/429` on an MQTT
//! session) or CONNACK 3, "server unavailable" (an MQTT CONNECT), **before** any credential is checked: a
//! storm costs no key derivation, no HMAC and no store read, and a key-guessing client learns nothing
//! while it is throttled. Requests that authenticate never take a token, so good devices are limited only
//! by the engine's own quotas; a good device behind the same address as a storm (NAT) is served again
//! once the bucket refills.
//!
//! Addresses are grouped as IPv4 addresses and IPv6 /64 prefixes (an IPv6 host usually holds a whole /64).
//! The state is bounded: at most `max_addresses` buckets are kept. When a new address would exceed that,
//! buckets that have refilled completely (they carry no information) are dropped first, then the quarter
//! that failed least recently.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

/// The limiter's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimits {
    /// Failed authentications an address may make per minute, sustained (0 turns the limiter off).
    pub per_minute: u32,
    /// How many failures an address may make at once before it is throttled (at least 1).
    pub burst: u32,
    /// The most addresses whose failures are remembered (at least 1).
    pub max_addresses: usize,
}

impl Default for AuthFailureLimits {
    fn default() -> Self {
        AuthFailureLimits { per_minute: 600, burst: 60, max_addresses: 10_000 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Failed-authentication buckets per client address (see the module documentation).
#[derive(Debug)]
pub struct AuthFailureLimiter {
    limits: AuthFailureLimits,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The address a bucket belongs to: IPv4 as is (also when mapped into IPv6), IPv6 by its /64 prefix.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl AuthFailureLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: AuthFailureLimits) -> Self {
        let limits = AuthFailureLimits {
            per_minute: limits.per_minute,
            burst: limits.burst.max(1),
            max_addresses: limits.max_addresses.max(1),
        };
        AuthFailureLimiter { limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// The settings in force.
    pub fn limits(&self) -> AuthFailureLimits {
        self.limits
    }

    fn enabled(&self) -> bool {
        self.limits.per_minute > 0
    }

    fn per_second(&self) -> f64 {
        f64::from(self.limits.per_minute) / 60.0
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tokens of `bucket` at `now`.
    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.per_second()).min(f64::from(self.limits.burst))
    }

    /// `Ok` when `ip` may try to authenticate now; otherwise the seconds until it may again (at least 1).
    pub fn check(&self, ip: IpAddr) -> Result<(), u32> {
        self.check_at(ip, Instant::now())
    }

    /// [`check`](Self::check) at `now`.
    pub fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), u32> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(bucket) = self.buckets().get(&bucket_key(ip)).copied() else {
            return Ok(());
        };
        let tokens = self.refilled(bucket, now);
        if tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - tokens) / self.per_second();
        Err(wait.ceil().clamp(1.0, 3600.0) as u32)
    }

    /// Records a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_at(ip, Instant::now());
    }

    /// [`failed`](Self::failed) at `now`.
    pub fn failed_at(&self, ip: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        let key = bucket_key(ip);
        let mut buckets = self.buckets();
        if !buckets.contains_key(&key) && buckets.len() >= self.limits.max_addresses {
            self.make_room(&mut buckets, now);
        }
        let full = Bucket { tokens: f64::from(self.limits.burst), updated: now };
        let bucket = buckets.entry(key).or_insert(full);
        let tokens = self.refilled(*bucket, now);
        *bucket = Bucket { tokens: (tokens - 1.0).max(0.0), updated: now };
    }

    /// Drops refilled buckets; if that frees nothing, the least recently failed quarter.
    fn make_room(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let burst = f64::from(self.limits.burst);
        buckets.retain(|_, b| self.refilled(*b, now) < burst);
        let max = self.limits.max_addresses;
        if buckets.len() < max {
            return;
        }
        let keep = max - max.div_ceil(4);
        let mut ages: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
        ages.sort_unstable();
        // Buckets updated at or before the cut-off go; ties may remove a few more than a quarter.
        let cut = ages.len().saturating_sub(keep).saturating_sub(1);
        if let Some(&oldest_kept) = ages.get(cut) {
            buckets.retain(|_, b| b.updated > oldest_kept);
        }
    }

    /// How many addresses are remembered.
    pub fn tracked(&self) -> usize {
        self.buckets().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn a_burst_then_throttled_until_refilled() {
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 60, burst: 3, max_addresses: 10 });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check_at(v4(1), t0), Ok(()));
            l.failed_at(v4(1), t0);
        }
        assert_eq!(l.check_at(v4(1), t0), Err(1));
        // Another address is unaffected.
        assert_eq!(l.check_at(v4(2), t0), Ok(()));
        // One token a second.
        assert_eq!(l.check_at(v4(1), t0 + Duration::from_millis(999)), Err(1));
        assert_eq!(l.check_at(v4(1), t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn retry_after_is_the_time_to_the_next_token() {
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 6, burst: 1, max_addresses: 10 });
        let t0 = Instant::now();
        l.failed_at(v4(1), t0);
        assert_eq!(l.check_at(v4(1), t0), Err(10));
        assert_eq!(l.check_at(v4(1), t0 + Duration::from_secs(4)), Err(6));
    }

    #[test]
    fn off_when_the_rate_is_zero() {
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 0, burst: 1, max_addresses: 10 });
        let t0 = Instant::now();
        for _ in 0..100 {
            l.failed_at(v4(1), t0);
        }
        assert_eq!(l.check_at(v4(1), t0), Ok(()));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn ipv6_addresses_share_their_64_prefix_and_mapped_ipv4_is_ipv4() {
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 60, burst: 1, max_addresses: 10 });
        let t0 = Instant::now();
        l.failed_at("2001:db8:1:2::1".parse().unwrap(), t0);
        assert!(l.check_at("2001:db8:1:2:ffff::9".parse().unwrap(), t0).is_err());
        assert!(l.check_at("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
        l.failed_at("::ffff:10.0.0.1".parse().unwrap(), t0);
        assert!(l.check_at("10.0.0.1".parse().unwrap(), t0).is_err());
    }

    #[test]
    fn the_state_is_bounded() {
        let max = 100;
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 60, burst: 2, max_addresses: max });
        let t0 = Instant::now();
        // A hundred thousand addresses, each failing once (none refilled): never more than `max` remembered.
        for n in 0..100_000u32 {
            l.failed_at(v4(n), t0 + Duration::from_micros(u64::from(n)));
            assert!(l.tracked() <= max, "{} after {n}", l.tracked());
        }
        // The most recent failures are still remembered: throttled after one more.
        let last = v4(99_999);
        l.failed_at(last, t0 + Duration::from_millis(100));
        assert!(l.check_at(last, t0 + Duration::from_millis(100)).is_err());
        // Refilled buckets are dropped first when room is needed.
        let l = AuthFailureLimiter::new(AuthFailureLimits { per_minute: 60, burst: 2, max_addresses: 3 });
        l.failed_at(v4(1), t0);
        l.failed_at(v4(2), t0);
        l.failed_at(v4(3), t0 + Duration::from_secs(5));
        l.failed_at(v4(3), t0 + Duration::from_secs(5));
        l.failed_at(v4(4), t0 + Duration::from_secs(5));
        assert_eq!(l.tracked(), 2);
        assert!(l.check_at(v4(3), t0 + Duration::from_secs(5)).is_err(), "the throttled one is kept");
    }
}
