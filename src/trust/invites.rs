//! Invite codes against guessing: a caller (by address, and by IP where the transport
//! knows it) gets a few wrong tries, then waits longer after each; and past a node-wide
//! rate of failures every invite attempt waits, so that fresh keys and many IPs do not
//! buy more guesses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::identity::Address;

/// Wrong codes a caller may try before it has to wait.
pub const FREE_ATTEMPTS: u32 = 5;
/// The first wait; each further failure doubles it, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Node-wide: more failures than this in [`NODE_WINDOW`] lock invites for a window.
const NODE_FAILURES: u32 = 100;
const NODE_WINDOW: Duration = Duration::from_secs(60);
/// Callers tracked at once; the oldest go first.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Address(Address),
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    until: Option<Instant>,
    last: Instant,
}

#[derive(Debug)]
struct NodeWide {
    window_start: Instant,
    failures: u32,
    until: Option<Instant>,
}

/// Failed invite attempts, per caller and node-wide.
#[derive(Debug)]
pub(crate) struct InviteGuard {
    strikes: Mutex<HashMap<Who, Strikes>>,
    node: Mutex<NodeWide>,
}

impl InviteGuard {
    pub(crate) fn new() -> Self {
        InviteGuard {
            strikes: Mutex::new(HashMap::new()),
            node: Mutex::new(NodeWide {
                window_start: Instant::now(),
                failures: 0,
                until: None,
            }),
        }
    }

    fn keys(address: Address, ip: Option<IpAddr>) -> impl Iterator<Item = Who> {
        std::iter::once(Who::Address(address)).chain(ip.map(Who::Ip))
    }

    /// How long this caller must wait before its next invite attempt, if at all.
    pub(crate) fn wait(&self, address: Address, ip: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = node.until.and_then(|u| u.checked_duration_since(now));
        drop(node);
        let strikes = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        for key in Self::keys(address, ip) {
            let left = strikes
                .get(&key)
                .and_then(|s| s.until)
                .and_then(|u| u.checked_duration_since(now));
            wait = wait.max(left);
        }
        wait
    }

    /// A wrong code: one more strike for the caller and its IP, and for the node.
    pub(crate) fn failed(&self, address: Address, ip: Option<IpAddr>) {
        let now = Instant::now();
        {
            let mut strikes = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
            if strikes.len() >= MAX_TRACKED {
                // Forget those whose wait is over, then the oldest.
                strikes.retain(|_, s| s.until.is_some_and(|u| u > now));
                if strikes.len() >= MAX_TRACKED {
                    if let Some(oldest) =
                        strikes.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k)
                    {
                        strikes.remove(&oldest);
                    }
                }
            }
            for key in Self::keys(address, ip) {
                let s = strikes.entry(key).or_insert(Strikes {
                    failures: 0,
                    until: None,
                    last: now,
                });
                s.failures += 1;
                s.last = now;
                if s.failures >= FREE_ATTEMPTS {
                    let doublings = (s.failures - FREE_ATTEMPTS).min(16);
                    let wait = (FIRST_WAIT * 2u32.pow(doublings)).min(MAX_WAIT);
                    s.until = Some(now + wait);
                    warn!(caller = %address.short(), ip = ?ip, failures = s.failures, wait_secs = wait.as_secs(), "wrong invite codes: the caller waits");
                }
            }
        }
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(node.window_start) > NODE_WINDOW {
            node.window_start = now;
            node.failures = 0;
        }
        node.failures += 1;
        if node.failures > NODE_FAILURES && node.until.is_none_or(|u| u <= now) {
            node.until = Some(now + NODE_WINDOW);
            warn!(
                failures = node.failures,
                "too many wrong invite codes node-wide: invites wait a minute"
            );
        }
    }

    /// A right code: the caller's strikes are forgiven (its IP's are not: others may
    /// share it and be guessing).
    pub(crate) fn succeeded(&self, address: Address) {
        self.strikes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&Who::Address(address));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn a_few_wrong_codes_then_a_growing_wait_for_the_address_and_its_ip() {
        let guard = InviteGuard::new();
        let a = Identity::from_seed([1; 32]).address();
        let b = Identity::from_seed([2; 32]).address();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        for _ in 0..FREE_ATTEMPTS - 1 {
            guard.failed(a, Some(ip));
            assert_eq!(guard.wait(a, Some(ip)), None);
        }
        guard.failed(a, Some(ip));
        let first = guard
            .wait(a, Some(ip))
            .expect("a wait after the free attempts");
        assert!(first > Duration::from_secs(20));
        // A fresh key from the same IP waits too; the same key from elsewhere as well.
        assert!(guard.wait(b, Some(ip)).is_some());
        assert!(guard.wait(a, None).is_some());
        guard.failed(a, Some(ip));
        assert!(guard.wait(a, None).unwrap() > first);
        // Another caller elsewhere is not affected.
        assert_eq!(guard.wait(b, Some("10.9.9.9".parse().unwrap())), None);
    }

    #[test]
    fn many_failures_across_the_node_lock_invites_for_everyone() {
        let guard = InviteGuard::new();
        for i in 0..=NODE_FAILURES {
            let fresh = Identity::from_seed([(i % 250) as u8; 32]).address();
            guard.failed(
                fresh,
                Some(IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8])),
            );
        }
        let newcomer = Identity::from_seed([251; 32]).address();
        assert!(guard
            .wait(newcomer, Some("10.200.0.1".parse().unwrap()))
            .is_some());
    }
}
