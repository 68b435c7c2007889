//! Rate limits as pure decisions (spec §10.2): a token bucket fed the current time.
//!
//! A [`Rate`] admits `limit` requests per `window` with a burst of `limit` (a full bucket is the whole
//! window's allowance, as Azure's per-minute quotas behave). The bucket is kept in the GCRA form (the
//! "theoretical arrival time" of the next request, [`Bucket`]): one integer per key, updated in O(1) with
//! integer arithmetic, exactly equivalent to a bucket of `limit` tokens refilled at `limit / window`.
//! A refused request takes no token and learns how long to wait ([`Throttled::retry_after_secs`], within the
//! 1..=300 s that every Azure device SDK accepts, spec §1.7).
//!
//! Nothing here reads a clock: callers pass `now` (a [`Timestamp`]), so a decision can be replayed and
//! tested exactly. Counters (one bucket per instance, per device, …) live with the caller.

use dps_proto::Timestamp;

/// A rate: at most `limit` requests per `window`, `limit` of them at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    limit: u32,
    window_nanos: i64,
    /// Nanoseconds between two tokens (`window / limit`, at least 1).
    interval_nanos: i64,
}

impl Rate {
    /// `limit` requests per `window_secs` seconds; `None` when either is zero (no limit).
    pub fn new(limit: u32, window_secs: u32) -> Option<Rate> {
        if limit == 0 || window_secs == 0 {
            return None;
        }
        let window_nanos = i64::from(window_secs) * 1_000_000_000;
        let interval_nanos = (window_nanos / i64::from(limit)).max(1);
        Some(Rate { limit, window_nanos, interval_nanos })
    }

    /// `limit` requests per minute.
    pub fn per_minute(limit: u32) -> Option<Rate> {
        Rate::new(limit, 60)
    }

    /// The most requests per window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window, in seconds.
    pub fn window_secs(&self) -> u32 {
        u32::try_from(self.window_nanos / 1_000_000_000).unwrap_or(u32::MAX)
    }
}

/// One key's bucket: the time at which the bucket is full again (GCRA's theoretical arrival time).
/// A new bucket ([`Bucket::default`]) is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    full_at_nanos: i64,
}

/// A refusal: the request exceeds the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Nanoseconds until one request would be admitted.
    pub wait_nanos: i64,
}

impl Throttled {
    /// The `Retry-After` to answer with: the wait rounded up to whole seconds, within 1..=300.
    pub fn retry_after_secs(&self) -> u32 {
        let secs = self.wait_nanos.saturating_add(999_999_999) / 1_000_000_000;
        u32::try_from(secs.clamp(1, 300)).unwrap_or(300)
    }
}

impl Bucket {
    /// Takes one token at `now` if the bucket has one (and records it); otherwise says how long to wait and
    /// leaves the bucket as it was.
    pub fn take(&mut self, rate: &Rate, now: Timestamp) -> Result<(), Throttled> {
        let now = now.unix_nanos();
        let start = self.full_at_nanos.max(now);
        let next = start.saturating_add(rate.interval_nanos);
        // Admitted while the bucket would not run past a whole window's worth of tokens.
        let over = next.saturating_sub(now).saturating_sub(rate.window_nanos);
        if over > 0 {
            return Err(Throttled { wait_nanos: over });
        }
        self.full_at_nanos = next;
        Ok(())
    }

    /// Whether the bucket is full at `now` (it carries no information and may be forgotten).
    pub fn is_full(&self, now: Timestamp) -> bool {
        self.full_at_nanos <= now.unix_nanos()
    }

    /// How many tokens the bucket holds at `now` (whole tokens, rounded down).
    pub fn tokens(&self, rate: &Rate, now: Timestamp) -> u32 {
        let used = self.full_at_nanos.saturating_sub(now.unix_nanos()).max(0);
        let used_tokens = (used + rate.interval_nanos - 1) / rate.interval_nanos;
        u32::try_from(i64::from(rate.limit).saturating_sub(used_tokens).max(0)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_nanos(1_700_000_000_000_000_000 + ms * 1_000_000)
    }

    #[test]
    fn a_full_window_at_once_then_one_per_interval() {
        // Azure's polling limit: 5 per 10 s per device.
        let rate = Rate::new(5, 10).unwrap();
        let mut b = Bucket::default();
        for _ in 0..5 {
            assert_eq!(b.take(&rate, at(0)), Ok(()));
        }
        let refused = b.take(&rate, at(0)).unwrap_err();
        assert_eq!(refused.wait_nanos, 2_000_000_000);
        assert_eq!(refused.retry_after_secs(), 2);
        // A refusal takes nothing: the next token still arrives 2 s later.
        assert!(b.take(&rate, at(1_999)).is_err());
        assert_eq!(b.take(&rate, at(2_000)), Ok(()));
        assert!(b.take(&rate, at(2_000)).is_err());
        // After a whole window of silence the bucket is full again.
        assert!(!b.is_full(at(11_999)));
        assert!(b.is_full(at(12_000)));
        assert_eq!(b.tokens(&rate, at(12_000)), 5);
        for _ in 0..5 {
            assert_eq!(b.take(&rate, at(12_000)), Ok(()));
        }
        assert!(b.take(&rate, at(12_000)).is_err());
    }

    #[test]
    fn sustained_rate_is_the_limit_per_window() {
        let rate = Rate::per_minute(1000).unwrap();
        let mut b = Bucket::default();
        let mut admitted = 0;
        // Ten thousand requests spread over two minutes: the burst of 1000 plus 1000 per minute.
        for i in 0..10_000 {
            if b.take(&rate, at(i * 12)).is_ok() {
                admitted += 1;
            }
        }
        assert!((2_990..=3_000).contains(&admitted), "{admitted}");
    }

    #[test]
    fn retry_after_is_rounded_up_and_clamped() {
        assert_eq!(Throttled { wait_nanos: 1 }.retry_after_secs(), 1);
        assert_eq!(Throttled { wait_nanos: 1_000_000_001 }.retry_after_secs(), 2);
        assert_eq!(Throttled { wait_nanos: 3_600_000_000_000 }.retry_after_secs(), 300);
        // 1 per hour: the wait is an hour, answered as the 300 s every SDK accepts.
        let rate = Rate::new(1, 3600).unwrap();
        let mut b = Bucket::default();
        assert!(b.take(&rate, at(0)).is_ok());
        assert_eq!(b.take(&rate, at(0)).unwrap_err().retry_after_secs(), 300);
    }

    #[test]
    fn zero_is_no_limit_and_time_going_back_is_harmless() {
        assert_eq!(Rate::new(0, 60), None);
        assert_eq!(Rate::new(5, 0), None);
        let rate = Rate::new(2, 1).unwrap();
        let mut b = Bucket::default();
        assert!(b.take(&rate, at(1_000)).is_ok());
        assert!(b.take(&rate, at(1_000)).is_ok());
        // A clock step backwards does not admit more than the burst.
        assert!(b.take(&rate, at(0)).is_err());
        assert_eq!(rate.limit(), 2);
        assert_eq!(rate.window_secs(), 1);
    }
}
