//! Step timings for the data path's slow paths (a task start, a reconcile
//! pass): where the time of one run went, logged at debug level as one
//! line, so a profile of convergence needs no external tool.

use std::fmt::Write;
use std::time::Instant;

/// The steps of one run and how long each took.
pub struct Steps {
    start: Instant,
    last: Instant,
    parts: Vec<(&'static str, u128)>,
}

impl Default for Steps {
    fn default() -> Self {
        Self::new()
    }
}

impl Steps {
    pub fn new() -> Self {
        let now = Instant::now();
        Steps {
            start: now,
            last: now,
            parts: Vec::new(),
        }
    }

    /// Ends the step running since the last mark, naming it.
    pub fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.parts
            .push((step, now.duration_since(self.last).as_micros()));
        self.last = now;
    }

    /// Milliseconds since the first step began.
    pub fn total_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// "step=1.2ms step=0.3ms …", in the order they ran.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (name, us) in &self.parts {
            if !s.is_empty() {
                s.push(' ');
            }
            let _ = write!(s, "{name}={:.1}ms", *us as f64 / 1e3);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_listed_in_order() {
        let mut s = Steps::new();
        s.mark("a");
        s.mark("b");
        let line = s.summary();
        assert!(line.starts_with("a=") && line.contains(" b="), "{line}");
        assert!(s.total_ms() >= 0.0);
    }
}
