//! Fault injection rules as pure decisions: which rule (if any) fires for a device request.
//!
//! A [`FaultRule`] names a registration-ID pattern ([`Glob`]: `*` any run of characters, `?` one
//! character, compared case-insensitively as registration IDs are), the requests it applies to
//! ([`FaultTarget`]), what it does ([`FaultAction`]), a probability and optionally how many times it may
//! fire. [`choose`] picks the first rule that matches and whose probability the caller's random roll
//! passes; the caller (the host) draws the roll from its injected RNG, keeps the counts and performs the
//! action, so this module stays free of clocks, randomness and I/O.

use dps_proto::{DpsError, ErrorCode};
use std::fmt;

/// A registration-ID pattern: `*` matches any run of characters (also none), `?` exactly one, anything
/// else itself, ignoring ASCII case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    lower: Vec<char>,
}

impl Glob {
    /// Parses a pattern (1..=128 characters, no control characters).
    pub fn parse(pattern: &str) -> Result<Glob, DpsError> {
        if pattern.is_empty() || pattern.chars().count() > 128 {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the registration ID pattern '{pattern}' must have 1 to 128 characters"),
            ));
        }
        if pattern.chars().any(char::is_control) {
            return Err(DpsError::with_message(
                ErrorCode::BadRequest,
                "the registration ID pattern must not contain control characters",
            ));
        }
        Ok(Glob { source: pattern.to_owned(), lower: pattern.to_ascii_lowercase().chars().collect() })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `text` matches (ASCII case ignored). Linear in the text for each `*` (no backtracking blow-up).
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
        let p = &self.lower;
        let (mut ti, mut pi) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < text.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == '?' || c == text[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Which device requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultTarget {
    /// Registers, operation-status polls and status lookups.
    #[default]
    Any,
    /// Registers (PUT register, `iotdps-register`) only.
    Register,
    /// Operation-status polls only.
    Poll,
}

impl FaultTarget {
    /// Parses `any`, `register` or `poll`.
    pub fn parse(s: &str) -> Option<FaultTarget> {
        match s.trim().to_ascii_lowercase().as_str() {
            "any" => Some(FaultTarget::Any),
            "register" => Some(FaultTarget::Register),
            "poll" => Some(FaultTarget::Poll),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultTarget::Any => "any",
            FaultTarget::Register => "register",
            FaultTarget::Poll => "poll",
        }
    }
}

/// The kind of device request being decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A register.
    Register,
    /// An operation-status poll.
    Poll,
    /// A device registration status lookup.
    StatusLookup,
}

impl FaultTarget {
    fn applies(self, kind: RequestKind) -> bool {
        match self {
            FaultTarget::Any => true,
            FaultTarget::Register => kind == RequestKind::Register,
            FaultTarget::Poll => kind == RequestKind::Poll,
        }
    }
}

/// What a rule does to a request it fires on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer `429` / `429001` with this Retry-After (1..=300 s), without running the request.
    Throttle {
        /// Seconds.
        retry_after_secs: u32,
    },
    /// Answer this 5xx error code of the table (e.g. 500000, 503000), without running the request.
    Error {
        /// The code (its HTTP status is `code / 1000`, at least 500).
        code: ErrorCode,
    },
    /// Delay the request by this many milliseconds (at most 60 000), then run it.
    Latency {
        /// Milliseconds.
        millis: u32,
    },
    /// The registration runs, but its polls answer `202 assigning` for this long after the register
    /// (`None`: forever, until the rule is removed).
    StuckAssigning {
        /// Seconds, or forever.
        secs: Option<u32>,
    },
    /// Close the connection without answering (HTTPS: no response; MQTT: the session is closed).
    DropConnection,
}

impl FaultAction {
    /// The metric label of the action (`throttle`, `error`, `latency`, `stuck_assigning`, `drop_connection`).
    pub fn kind(&self) -> FaultKind {
        match self {
            FaultAction::Throttle { .. } => FaultKind::Throttle,
            FaultAction::Error { .. } => FaultKind::Error,
            FaultAction::Latency { .. } => FaultKind::Latency,
            FaultAction::StuckAssigning { .. } => FaultKind::StuckAssigning,
            FaultAction::DropConnection => FaultKind::DropConnection,
        }
    }

    /// An error action, checked: the code must be a 5xx of the table.
    pub fn error(code: u32) -> Result<FaultAction, DpsError> {
        match ErrorCode::from_code(code) {
            Some(c) if c.http_status() >= 500 => Ok(FaultAction::Error { code: c }),
            _ => {
                let known: Vec<String> = ErrorCode::ALL
                    .iter()
                    .filter(|c| c.http_status() >= 500)
                    .map(|c| c.code().to_string())
                    .collect();
                Err(DpsError::with_message(
                    ErrorCode::BadRequest,
                    format!("code {code} is not a 5xx code of the error table (one of {})", known.join(", ")),
                ))
            }
        }
    }
}

/// The kinds of fault, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// [`FaultAction::Throttle`].
    Throttle,
    /// [`FaultAction::Error`].
    Error,
    /// [`FaultAction::Latency`].
    Latency,
    /// [`FaultAction::StuckAssigning`].
    StuckAssigning,
    /// [`FaultAction::DropConnection`].
    DropConnection,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Throttle,
        FaultKind::Error,
        FaultKind::Latency,
        FaultKind::StuckAssigning,
        FaultKind::DropConnection,
    ];

    /// The name (`throttle`, `error`, `latency`, `stuck_assigning`, `drop_connection`), as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Throttle => "throttle",
            FaultKind::Error => "error",
            FaultKind::Latency => "latency",
            FaultKind::StuckAssigning => "stuck_assigning",
            FaultKind::DropConnection => "drop_connection",
        }
    }

    /// Parses a name `as_str` gives.
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The position in [`FaultKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One fault rule.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// Its name (unique within a rule set; how the admin API removes it).
    pub id: String,
    /// Registration IDs it applies to.
    pub pattern: Glob,
    /// Requests it applies to.
    pub target: FaultTarget,
    /// What it does.
    pub action: FaultAction,
    /// The chance it fires on a matching request, 0.0..=1.0.
    pub probability: f64,
    /// The most times it fires (None: unlimited).
    pub times: Option<u64>,
}

impl FaultRule {
    /// Checks the rule's values: probability within 0..=1, Retry-After within 1..=300, latency at most
    /// 60 s, a stuck duration of at least 1 s, times at least 1, an ID of 1..=64 letters, digits, `-`,
    /// `_` or `.`. The message names what is wrong (the caller adds which rule).
    pub fn validate(&self) -> Result<(), DpsError> {
        let bad = |m: String| Err(DpsError::with_message(ErrorCode::BadRequest, m));
        if self.id.is_empty()
            || self.id.len() > 64
            || !self.id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(format!(
                "id '{}' must have 1 to 64 letters, digits, '-', '_' or '.'",
                self.id.escape_debug()
            ));
        }
        if !(0.0..=1.0).contains(&self.probability) {
            return bad(format!("probability {} is not within 0.0..=1.0", self.probability));
        }
        if self.times == Some(0) {
            return bad("times must be at least 1 (leave it out for no limit)".into());
        }
        match self.action {
            FaultAction::Throttle { retry_after_secs } if !(1..=300).contains(&retry_after_secs) => {
                bad(format!("retry_after_secs {retry_after_secs} is not within 1..=300"))
            }
            FaultAction::Latency { millis } if millis > 60_000 => {
                bad(format!("latency_ms {millis} is over the 60000 ms limit"))
            }
            FaultAction::Latency { millis: 0 } => bad("latency_ms must be at least 1".into()),
            FaultAction::StuckAssigning { secs: Some(0) } => {
                bad("duration_secs must be at least 1 (leave it out for forever)".into())
            }
            FaultAction::Error { code } if code.http_status() < 500 => {
                bad(format!("code {} is not a 5xx code", code.code()))
            }
            _ => Ok(()),
        }
    }

    /// Whether the rule applies to this request (pattern and target; not the probability). A stuck
    /// `assigning` starts at a register, so such a rule applies to registers only.
    pub fn applies(&self, registration_id: &str, kind: RequestKind) -> bool {
        let target = match self.action {
            FaultAction::StuckAssigning { .. } => kind == RequestKind::Register,
            _ => self.target.applies(kind),
        };
        target && self.pattern.matches(registration_id)
    }
}

/// The first rule that applies to the request, may still fire (`fired[i]` is how often rule `i` has
/// fired) and whose probability `roll` (uniform in 0.0..1.0, drawn by the caller) passes. Rules are tried in
/// order; a rule that applies but is not rolled lets the next one be tried with a fresh roll from
/// `roll`.
pub fn choose(
    rules: &[FaultRule],
    fired: &[u64],
    registration_id: &str,
    kind: RequestKind,
    mut roll: impl FnMut() -> f64,
) -> Option<usize> {
    rules.iter().enumerate().position(|(i, rule)| {
        if !rule.applies(registration_id, kind) {
            return false;
        }
        if rule.times.is_some_and(|max| fired.get(i).copied().unwrap_or(0) >= max) {
            return false;
        }
        rule.probability >= 1.0 || (rule.probability > 0.0 && roll() < rule.probability)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Glob {
        Glob::parse(p).unwrap()
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("*").matches(""));
        assert!(glob("*").matches("anything"));
        assert!(glob("sensor-*").matches("sensor-1"));
        assert!(glob("sensor-*").matches("SENSOR-"));
        assert!(!glob("sensor-*").matches("sensor"));
        assert!(glob("s?n*r-*7").matches("sensor-007"));
        assert!(!glob("s?n*r-*7").matches("sensor-008"));
        assert!(glob("*-flaky-*").matches("a-flaky-b"));
        assert!(glob("a*a*a*a*b").matches("aaaaaaaaaaaaaaaaaaaaab"));
        assert!(!glob("a*a*a*a*b").matches(&"a".repeat(200)));
        assert!(glob("exact").matches("EXACT"));
        assert!(!glob("exact").matches("exactly"));
        assert!(Glob::parse("").is_err());
        assert!(Glob::parse(&"x".repeat(129)).is_err());
        assert!(Glob::parse("a\nb").is_err());
    }

    fn rule(id: &str, pattern: &str, action: FaultAction, probability: f64) -> FaultRule {
        FaultRule {
            id: id.into(),
            pattern: glob(pattern),
            target: FaultTarget::Any,
            action,
            probability,
            times: None,
        }
    }

    #[test]
    fn the_first_applicable_rule_that_rolls_fires() {
        let rules = vec![
            rule("a", "flaky-*", FaultAction::Throttle { retry_after_secs: 3 }, 0.5),
            rule("b", "*", FaultAction::Latency { millis: 10 }, 1.0),
        ];
        let fired = [0, 0];
        assert_eq!(choose(&rules, &fired, "flaky-1", RequestKind::Register, || 0.49), Some(0));
        assert_eq!(choose(&rules, &fired, "flaky-1", RequestKind::Register, || 0.5), Some(1));
        assert_eq!(choose(&rules, &fired, "good-1", RequestKind::Poll, || 0.0), Some(1));
        // Probability 0 never fires and draws nothing.
        let never = vec![rule("n", "*", FaultAction::DropConnection, 0.0)];
        assert_eq!(choose(&never, &[0], "x", RequestKind::Register, || unreachable!()), None);
    }

    #[test]
    fn targets_and_times_limit_a_rule() {
        let mut r = rule("p", "*", FaultAction::StuckAssigning { secs: Some(5) }, 1.0);
        r.target = FaultTarget::Register;
        r.times = Some(2);
        let rules = vec![r];
        assert_eq!(choose(&rules, &[0], "d", RequestKind::Poll, || 0.0), None);
        assert_eq!(choose(&rules, &[1], "d", RequestKind::Register, || 0.0), Some(0));
        assert_eq!(choose(&rules, &[2], "d", RequestKind::Register, || 0.0), None);
        // A stuck assigning starts at the register whatever the target says.
        let any = vec![rule("s", "*", FaultAction::StuckAssigning { secs: None }, 1.0)];
        assert_eq!(choose(&any, &[0], "d", RequestKind::Poll, || 0.0), None);
        assert_eq!(choose(&any, &[0], "d", RequestKind::Register, || 0.0), Some(0));
    }

    #[test]
    fn validation_names_the_bad_value() {
        let check = |r: FaultRule, needle: &str| {
            let e = r.validate().unwrap_err();
            assert!(e.message.contains(needle), "{}", e.message);
        };
        check(rule("a", "*", FaultAction::Throttle { retry_after_secs: 0 }, 1.0), "retry_after_secs");
        check(rule("a", "*", FaultAction::Throttle { retry_after_secs: 301 }, 1.0), "retry_after_secs");
        check(rule("a", "*", FaultAction::Latency { millis: 60_001 }, 1.0), "latency_ms");
        check(rule("a", "*", FaultAction::DropConnection, 1.5), "probability");
        check(rule("a", "*", FaultAction::DropConnection, f64::NAN), "probability");
        check(rule("a b", "*", FaultAction::DropConnection, 1.0), "id");
        check(rule("a", "*", FaultAction::StuckAssigning { secs: Some(0) }, 1.0), "duration_secs");
        let mut r = rule("a", "*", FaultAction::DropConnection, 1.0);
        r.times = Some(0);
        check(r, "times");
        assert!(FaultAction::error(500_000).is_ok());
        assert!(FaultAction::error(401_000).unwrap_err().message.contains("500000"));
        assert!(FaultAction::error(123).is_err());
        assert!(rule("ok", "*", FaultAction::Error { code: ErrorCode::InternalError }, 0.25)
            .validate()
            .is_ok());
        assert_eq!(FaultKind::parse("STUCK_ASSIGNING"), Some(FaultKind::StuckAssigning));
        assert_eq!(FaultTarget::parse("poll"), Some(FaultTarget::Poll));
    }
}
