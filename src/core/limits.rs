//! Rate limits against amplification and password guessing.
//!
//! [`RateLimiter`] is a fixed table of token buckets indexed by a keyed hash of the key (a
//! client address, or a user and an address): memory does not grow with the number of sources,
//! and keys that collide share a bucket (which only makes the limit stricter for them). The hash
//! key is random per process so that nobody can aim collisions at someone else's bucket.
//!
//! [`FailureLog`] turns a stream of authentication failures into one log line per user and
//! window: the first failure, then a count when the window closes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::{Duration, Instant};

use tracing::info;

#[derive(Clone, Copy, Default)]
struct Bucket {
    tokens: f32,
    /// Milliseconds since the limiter's epoch when the bucket was last filled.
    at: u32,
    used: bool,
}

/// Token buckets in a fixed table.
pub struct RateLimiter {
    buckets: Box<[Bucket]>,
    per_second: f32,
    burst: f32,
    epoch: Instant,
    hasher: RandomState,
}

impl RateLimiter {
    /// `slots` buckets (a power of two), each refilling `per_second` up to `burst`.
    pub fn new(slots: usize, per_second: f32, burst: f32, epoch: Instant) -> Self {
        RateLimiter {
            buckets: vec![Bucket::default(); slots.next_power_of_two()].into_boxed_slice(),
            per_second,
            burst,
            epoch,
            hasher: RandomState::new(),
        }
    }

    /// Takes a token for `key` at `now`; `false` when the bucket is empty.
    pub fn allow(&mut self, key: impl Hash, now: Instant) -> bool {
        let b = self.refill(key, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether `key` has a token at `now`, without taking it.
    pub fn has_token(&mut self, key: impl Hash, now: Instant) -> bool {
        self.refill(key, now).tokens >= 1.0
    }

    fn refill(&mut self, key: impl Hash, now: Instant) -> &mut Bucket {
        let i = (self.hasher.hash_one(key) as usize) & (self.buckets.len() - 1);
        let ms = now
            .saturating_duration_since(self.epoch)
            .as_millis()
            .min(u32::MAX as u128) as u32;
        let (per_second, burst) = (self.per_second, self.burst);
        let b = &mut self.buckets[i];
        if !b.used {
            *b = Bucket {
                tokens: burst,
                at: ms,
                used: true,
            };
        }
        let elapsed = ms.saturating_sub(b.at) as f32 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_second).min(burst);
        b.at = ms;
        b
    }
}

/// The window over which authentication failures for one user are counted and logged once.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Users tracked at once; failures for users beyond are counted under one entry.
const MAX_TRACKED: usize = 4096;

/// One log line per user and window for failed authentications.
#[derive(Default)]
pub struct FailureLog {
    users: HashMap<Box<str>, (Instant, u32)>,
}

impl FailureLog {
    /// Records a failure for `user` (already mapped to a known name or a placeholder).
    pub fn record(
        &mut self,
        user: &str,
        client: &dyn std::fmt::Display,
        reason: &str,
        now: Instant,
    ) {
        let key: &str = if self.users.len() >= MAX_TRACKED && !self.users.contains_key(user) {
            "(other users)"
        } else {
            user
        };
        match self.users.get_mut(key) {
            Some((start, count)) if now.saturating_duration_since(*start) < FAILURE_WINDOW => {
                *count += 1;
            }
            Some((start, count)) => {
                if *count > 1 {
                    info!(
                        user = key,
                        failures = *count,
                        window_s = FAILURE_WINDOW.as_secs(),
                        "authentication failures"
                    );
                }
                *start = now;
                *count = 1;
                info!(user = key, %client, reason, "authentication failed");
            }
            None => {
                self.users.insert(key.into(), (now, 1));
                info!(user = key, %client, reason, "authentication failed");
            }
        }
    }

    /// Reports and forgets windows that have closed.
    pub fn sweep(&mut self, now: Instant) {
        self.users.retain(|user, (start, count)| {
            let open = now.saturating_duration_since(*start) < FAILURE_WINDOW;
            if !open && *count > 1 {
                info!(
                    user = &**user,
                    failures = *count,
                    window_s = FAILURE_WINDOW.as_secs(),
                    "authentication failures"
                );
            }
            open
        });
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(64, 10.0, 5.0, t0);
        let allowed = (0..20).filter(|_| l.allow("a", t0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(!l.allow("a", t0 + Duration::from_millis(50)));
        assert!(
            l.allow("a", t0 + Duration::from_millis(150)),
            "one token per 100 ms"
        );
        // Another key has its own bucket (64 slots: a collision with "a" is unlikely but
        // possible; a second distinct key makes the check robust).
        assert!(l.allow("b", t0) || l.allow("c", t0));
    }

    #[test]
    fn failures_are_logged_once_per_window() {
        let t0 = Instant::now();
        let mut f = FailureLog::default();
        for i in 0..100 {
            f.record(
                "alice",
                &"udp:1.2.3.4:5",
                "bad credentials",
                t0 + Duration::from_millis(i),
            );
        }
        assert_eq!(f.users.get("alice").map(|e| e.1), Some(100));
        f.sweep(t0 + FAILURE_WINDOW + Duration::from_secs(1));
        assert_eq!(f.tracked(), 0);
        for i in 0..(MAX_TRACKED + 10) {
            f.record(&format!("u{i}"), &"x", "bad credentials", t0);
        }
        assert_eq!(f.tracked(), MAX_TRACKED + 1);
    }
}
