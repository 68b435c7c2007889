//! CPU time from Linux `/proc` (user + system time, in clock ticks of 10 ms): of a whole process (a spawned
//! server, including its finished threads), of this process, or of chosen threads of this process (the
//! baseline server's runtime). Elsewhere every reading is `None` and reports print `-`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Linux's `USER_HZ`, the unit of `/proc/*/stat` times (100 on every mainstream architecture).
const TICKS_PER_SECOND: u64 = 100;

/// `utime + stime` from the text of a `/proc/.../stat` file.
pub fn parse_stat_cpu(stat: &str) -> Option<Duration> {
    // The command name (field 2) is in parentheses and may contain spaces: fields are counted after the
    // last ')'. There, field 3 (state) is index 0, so utime (14) and stime (15) are indexes 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some(Duration::from_millis(ticks.checked_mul(1000 / TICKS_PER_SECOND)?))
}

fn read_stat(path: &str) -> Option<Duration> {
    parse_stat_cpu(&std::fs::read_to_string(path).ok()?)
}

/// CPU time of a process (all its threads, past and present).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    read_stat(&format!("/proc/{pid}/stat"))
}

/// CPU time of this process.
pub fn self_cpu() -> Option<Duration> {
    read_stat("/proc/self/stat")
}

/// Machine-wide CPU time from the first line of `/proc/stat`: `(busy, total)` summed over all cores, where
/// busy excludes idle and iowait.
pub fn parse_machine_cpu(stat: &str) -> Option<(Duration, Duration)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|t| t.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let ms = |t: u64| Duration::from_millis(t * (1000 / TICKS_PER_SECOND));
    Some((ms(total.saturating_sub(idle)), ms(total)))
}

/// Machine-wide `(busy, total)` CPU time so far.
pub fn machine_cpu() -> Option<(Duration, Duration)> {
    parse_machine_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The kernel thread ID of the calling thread.
pub fn current_thread_id() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// CPU time of these threads of this process (threads that have exited count as zero).
pub fn threads_cpu(tids: &[u32]) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut any = false;
    for tid in tids {
        if let Some(t) = read_stat(&format!("/proc/self/task/{tid}/stat")) {
            total += t;
            any = true;
        }
    }
    any.then_some(total)
}

/// Whose CPU time is the server's.
#[derive(Debug, Clone, Default)]
pub enum ServerCpu {
    /// Not measured.
    #[default]
    Unknown,
    /// A separate process.
    Process(u32),
    /// Threads of this process (registered as they start).
    Threads(Arc<Mutex<Vec<u32>>>),
}

impl ServerCpu {
    /// The server's CPU time so far.
    pub fn read(&self) -> Option<Duration> {
        match self {
            ServerCpu::Unknown => None,
            ServerCpu::Process(pid) => process_cpu(*pid),
            ServerCpu::Threads(tids) => {
                let tids = tids.lock().map(|t| t.clone()).unwrap_or_default();
                threads_cpu(&tids)
            }
        }
    }

    /// Whether the server runs inside this process (its CPU time is then part of [`self_cpu`]).
    pub fn is_in_process(&self) -> bool {
        matches!(self, ServerCpu::Threads(_))
    }
}

/// A reading of the server's and this process's CPU time, to subtract from a later one.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    server: Option<Duration>,
    process: Option<Duration>,
    machine: Option<(Duration, Duration)>,
}

impl CpuMark {
    /// Reads both now.
    pub fn now(server: &ServerCpu) -> CpuMark {
        CpuMark { server: server.read(), process: self_cpu(), machine: machine_cpu() }
    }

    /// CPU used since this mark: the server's, and the load generator's own (this process minus the server
    /// when the server runs in it).
    pub fn since(&self, server: &ServerCpu) -> crate::stats::CpuUse {
        let later = CpuMark::now(server);
        let delta = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        let server_used = delta(self.server, later.server);
        let process_used = delta(self.process, later.process);
        let client = if server.is_in_process() {
            process_used.zip(server_used).map(|(p, s)| p.saturating_sub(s))
        } else {
            process_used
        };
        let machine = self
            .machine
            .zip(later.machine)
            .map(|((b0, t0), (b1, t1))| (b1.saturating_sub(b0), t1.saturating_sub(t0)));
        crate::stats::CpuUse {
            server: server_used,
            client,
            machine_busy: machine.map(|m| m.0),
            machine_total: machine.map(|m| m.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (dps server) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_cpu(stat), Some(Duration::from_millis(3000)));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert_eq!(parse_stat_cpu("1 (x) S 1"), None);
    }

    #[test]
    fn machine_cpu_excludes_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        let (busy, total) = parse_machine_cpu(stat).unwrap();
        assert_eq!(busy, Duration::from_millis(1600));
        assert_eq!(total, Duration::from_millis(9800));
        assert_eq!(parse_machine_cpu("intr 1 2 3"), None);
    }

    #[test]
    fn this_process_can_be_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(self_cpu().is_some());
            let tid = current_thread_id().unwrap();
            assert!(threads_cpu(&[tid]).is_some());
            assert!(process_cpu(std::process::id()).is_some());
            assert!(machine_cpu().is_some());
        }
    }
}
