//! Failed joins, counted per source address: a join proof is an HMAC of a
//! 128-bit secret, so guessing is hopeless, but a flood of attempts still
//! costs each manager a signature check and a log line per try.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed from one address within [`WINDOW`] before further
/// attempts are refused without being checked.
pub const MAX_FAILURES: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(60);

/// Tracks failures per address; each address's window starts at its first
/// failure and is forgotten once it has passed.
#[derive(Default)]
pub struct JoinLimiter {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl JoinLimiter {
    /// `Err(seconds to wait)` if `addr` used up its failures.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), u64> {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match f.get(&addr) {
            Some((since, n)) if now.duration_since(*since) < WINDOW && *n >= MAX_FAILURES => {
                Err((WINDOW - now.duration_since(*since)).as_secs().max(1))
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, addr: IpAddr, now: Instant) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Old windows are dropped as we go, so the map stays small.
        f.retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
        let entry = f.entry(addr).or_insert((now, 0));
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_max_failures_until_the_window_passes() {
        let l = JoinLimiter::default();
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        assert!(l.check(a, t0 + Duration::from_secs(1)).is_err());
        assert!(l.check(b, t0).is_ok(), "other addresses are not affected");
        assert!(l.check(a, t0 + WINDOW).is_ok(), "the window passes");
    }
}
