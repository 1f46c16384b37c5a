//! Rate limiting for log lines a guest can trigger, so no guest can flood the log.

use std::time::{Duration, Instant};

/// A token bucket: `burst` lines at once, refilled at `per_sec`; suppressed lines are
/// counted and reported with the next line that gets through.
#[derive(Debug)]
pub struct LogLimiter {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(10, 1.0)
    }
}

impl LogLimiter {
    pub fn new(burst: u32, per_sec: f64) -> Self {
        LogLimiter {
            burst: f64::from(burst),
            per_sec,
            tokens: f64::from(burst),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were suppressed before it.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        let dt = now
            .saturating_duration_since(self.last)
            .min(Duration::from_secs(3600));
        self.last = now;
        self.tokens = (self.tokens + dt.as_secs_f64() * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// `tracing::warn!` through a token bucket of its own call site (10 lines, then 1 a
/// second), with the count of lines suppressed before it: for warnings a guest can
/// trigger on paths shared by all guests (the output's flip and modeset errors).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: std::sync::Mutex<Option<$crate::log_limit::LogLimiter>> =
            std::sync::Mutex::new(None);
        let allowed = LIMIT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with($crate::log_limit::LogLimiter::default)
            .allow();
        if let Some(suppressed) = allowed {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    #[test]
    fn bursts_then_suppresses() {
        let mut l = super::LogLimiter::new(3, 0.0);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.tokens = 1.0;
        assert_eq!(l.allow(), Some(2));
    }
}
