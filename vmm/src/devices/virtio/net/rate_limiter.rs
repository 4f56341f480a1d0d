//! Token buckets for one direction of a device: bytes per second and frames per second, each
//! with a bucket size (burst). A frame passes when every bucket holds its cost; otherwise the
//! limiter arms a timer (a non-blocking timerfd the event loop waits on) for the moment the
//! buckets will have refilled enough, and the device waits for it. Nothing is dropped here.
//!
//! Tokens are kept in unit-nanoseconds (units x 1e9) so refills are exact integer arithmetic
//! at any rate.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::{Bucket, RateLimit};

const NS: u128 = 1_000_000_000;

/// One token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens x 1e9.
    budget: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(b: Bucket, now: Instant) -> Self {
        Self { rate: b.rate.max(1), burst: b.burst, budget: u128::from(b.burst) * NS, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        self.last = now.max(self.last);
        let cap = u128::from(self.burst) * NS;
        self.budget = self.budget.saturating_add(ns.saturating_mul(u128::from(self.rate))).min(cap);
    }

    /// Whether `n` units can be paid at `now`; if not, how long until they can.
    fn wait_for(&mut self, n: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let need = u128::from(n.min(self.burst)) * NS;
        if self.budget >= need {
            return None;
        }
        let ns = (need - self.budget).div_ceil(u128::from(self.rate));
        Some(
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
                .max(Duration::from_micros(1)),
        )
    }

    fn take(&mut self, n: u64) {
        // A frame larger than the bucket (frames bucket of 1) takes it all.
        let need = u128::from(n.min(self.burst)) * NS;
        self.budget = self.budget.saturating_sub(need);
    }

    /// Whole tokens now (after a refill at `now`).
    pub fn tokens(&mut self, now: Instant) -> u64 {
        self.refill(now);
        u64::try_from(self.budget / NS).unwrap_or(u64::MAX)
    }
}

/// A one-shot, non-blocking timerfd.
#[derive(Debug)]
struct Timer(OwnedFd);

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the returned descriptor is owned here.
        let fd = unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn arm(&self, after: Duration) -> std::io::Result<()> {
        let after = after.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos()),
            },
        };
        // SAFETY: `spec` is a valid itimerspec read by the call; the old value is not asked for
        // (null); the descriptor is an open timerfd.
        if unsafe {
            libc::timerfd_settime(self.0.as_raw_fd(), 0, &raw const spec, std::ptr::null_mut())
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads (clears) the expiry count; 0 if it has not fired.
    fn drain(&self) -> u64 {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, which is 8 bytes long; non-blocking fd.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut n).cast(), 8) };
        if r == 8 {
            n
        } else {
            0
        }
    }
}

/// The limits of one direction, and the timer that wakes the device when they allow more.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    frames: Option<TokenBucket>,
    timer: Timer,
    blocked: bool,
    /// Times a frame had to wait.
    pub throttled: u64,
}

impl RateLimiter {
    /// A limiter with `limit`'s buckets (full), or none.
    pub fn new(limit: RateLimit) -> std::io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bytes: limit.bytes.map(|b| TokenBucket::new(b, now)),
            frames: limit.frames.map(|b| TokenBucket::new(b, now)),
            timer: Timer::new()?,
            blocked: false,
            throttled: 0,
        })
    }

    /// Whether any bucket is set.
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.frames.is_some()
    }

    /// Waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer's descriptor (readable when the limiter may allow more).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.0.as_raw_fd()
    }

    /// Whether a frame of `bytes` may pass at `now` (without paying). If not, the timer is
    /// armed for when it can and the limiter is blocked until [`Self::timer_fired`].
    pub fn check(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait = [
            self.bytes.as_mut().and_then(|b| b.wait_for(bytes, now)),
            self.frames.as_mut().and_then(|b| b.wait_for(1, now)),
        ]
        .into_iter()
        .flatten()
        .max();
        match wait {
            None => true,
            Some(d) => {
                self.blocked = true;
                self.throttled += 1;
                if self.timer.arm(d).is_err() {
                    // No timer: do not wedge the device; let the frame through.
                    self.blocked = false;
                    return true;
                }
                false
            }
        }
    }

    /// Pays for a frame of `bytes` (after [`Self::check`] said it may pass).
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.frames.as_mut() {
            b.take(1);
        }
    }

    /// The timer fired (or the event loop says so): unblocks. Returns whether it had fired.
    pub fn timer_fired(&mut self) -> bool {
        let fired = self.timer.drain() > 0;
        if fired {
            self.blocked = false;
        }
        fired
    }

    /// Unblocks without waiting for the timer (tests, reset).
    pub fn unblock(&mut self) {
        self.blocked = false;
        let _ = self.timer.drain();
    }

    /// Whole tokens in the byte bucket at `now` (for tests).
    pub fn byte_tokens(&mut self, now: Instant) -> Option<u64> {
        self.bytes.as_mut().map(|b| b.tokens(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Bucket { rate: 1000, burst: 500 }, t0);
        assert_eq!(b.wait_for(500, t0), None);
        b.take(500);
        assert_eq!(b.tokens(t0), 0);
        // 100 tokens take 100 ms at 1000/s.
        assert_eq!(b.wait_for(100, t0), Some(Duration::from_millis(100)));
        assert_eq!(b.tokens(t0 + Duration::from_millis(250)), 250);
        assert_eq!(b.tokens(t0 + Duration::from_secs(10)), 500, "capped at the burst");
        // A cost above the bucket size waits for a full bucket, then takes it all.
        b.take(400);
        assert_eq!(
            b.wait_for(10_000, t0 + Duration::from_secs(10)),
            Some(Duration::from_millis(400))
        );
    }

    #[test]
    fn a_limiter_blocks_arms_its_timer_and_unblocks() {
        let limit = RateLimit {
            bytes: Some(Bucket { rate: 1_000_000, burst: 100_000 }),
            frames: Some(Bucket { rate: 1000, burst: 8 }),
        };
        let mut l = RateLimiter::new(limit).unwrap();
        let t0 = Instant::now();
        assert!(l.is_limited());
        for _ in 0..8 {
            assert!(l.check(1000, t0));
            l.charge(1000);
        }
        // The frame bucket (8) is empty: the 9th waits ~1 ms.
        assert!(!l.check(1000, t0));
        assert!(l.is_blocked());
        assert!(!l.check(1, t0 + Duration::from_secs(1)), "blocked until the timer fires");
        let mut fds = libc::pollfd { fd: l.timer_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&raw mut fds, 1, 2000) };
        assert_eq!(n, 1, "the timer fires");
        assert!(l.timer_fired());
        assert!(!l.is_blocked());
        assert!(l.check(1000, Instant::now()));
        assert_eq!(l.throttled, 1);
        assert!(l.byte_tokens(t0) >= Some(92_000), "8 frames of 1000 bytes paid");
        let mut free = RateLimiter::new(RateLimit::default()).unwrap();
        assert!(!free.is_limited());
        assert!(free.check(u64::MAX, t0));
    }
}
