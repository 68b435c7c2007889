//! Timestamps. The pure crates never read a clock: callers pass a [`Timestamp`] in.

use std::fmt;

/// A UTC instant with nanosecond precision, as nanoseconds since the Unix epoch (years 1678 to 2262).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// From nanoseconds since the Unix epoch.
    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Timestamp(nanos)
    }

    /// From whole seconds since the Unix epoch.
    pub const fn from_unix_seconds(secs: i64) -> Self {
        Timestamp(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (rounded down).
    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1_000_000_000)
    }

    /// This instant plus some milliseconds.
    #[must_use]
    pub const fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms.saturating_mul(1_000_000)))
    }

    /// ISO-8601 UTC with seven fractional digits and `Z`, as Azure prints it
    /// (`2022-08-31T22:02:50.5163352Z`).
    pub fn to_iso(self) -> String {
        self.to_string()
    }

    /// RFC 1123 in GMT, as ARM prints certificate dates (`Thu, 12 Oct 2017 19:23:50 GMT`).
    pub fn to_rfc1123(self) -> String {
        const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        const MONTHS: [&str; 12] =
            ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0)) {
            Ok(t) => format!(
                "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
                DAYS[usize::from(t.weekday().number_days_from_monday())],
                t.day(),
                MONTHS[usize::from(u8::from(t.month()) - 1)],
                t.year(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => "Fri, 31 Dec 9999 23:59:59 GMT".to_owned(),
        }
    }

    /// Parses an RFC 3339 timestamp (any number of fractional digits, any offset).
    pub fn parse_iso(s: &str) -> Option<Self> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        i64::try_from(t.unix_timestamp_nanos()).ok().map(Timestamp)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0)) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 100
            ),
            Err(_) => f.write_str("9999-12-31T23:59:59.9999999Z"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_azure() {
        let t = Timestamp::from_unix_nanos(1_661_983_370_516_335_200);
        assert_eq!(t.to_iso(), "2022-08-31T22:02:50.5163352Z");
        assert_eq!(Timestamp::parse_iso("2022-08-31T22:02:50.5163352Z"), Some(t));
        assert_eq!(Timestamp::from_unix_seconds(0).to_iso(), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(Timestamp::parse_iso("not a time"), None);
    }

    #[test]
    fn formats_rfc1123_like_arm() {
        let t = Timestamp::parse_iso("2017-10-12T19:23:50.25Z").unwrap();
        assert_eq!(t.to_rfc1123(), "Thu, 12 Oct 2017 19:23:50 GMT");
        assert_eq!(Timestamp::from_unix_seconds(0).to_rfc1123(), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
