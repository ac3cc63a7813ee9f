//! Allocation counts behind `user-quota`, `ip-quota` and `total-quota`. Quotas are per server,
//! and a server may run several cores (one `Server` each), so the counts are shared between
//! them behind a mutex. It is taken once per Allocate and once per allocation's end, never on
//! the relay path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_user: HashMap<Box<str>, u32>,
    per_ip: HashMap<IpAddr, u32>,
}

/// Which quota refused an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Total,
    User,
    Ip,
}

/// Shared allocation counts; clones share the same counts.
#[derive(Debug, Clone, Default)]
pub struct QuotaBook(Arc<Mutex<Counts>>);

/// The limits to check against; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: u32,
    pub user: u32,
    pub ip: u32,
}

impl QuotaBook {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Nothing panics while holding the lock; if something did, the counts are still
        // consistent (each update is a single increment or decrement).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more allocation for `user` from `ip` if every quota allows it.
    pub fn take(&self, user: &str, ip: IpAddr, limits: Limits) -> Result<(), Exceeded> {
        let mut c = self.counts();
        if limits.total > 0 && c.total >= limits.total {
            return Err(Exceeded::Total);
        }
        if limits.user > 0 && c.per_user.get(user).copied().unwrap_or(0) >= limits.user {
            return Err(Exceeded::User);
        }
        if limits.ip > 0 && c.per_ip.get(&ip).copied().unwrap_or(0) >= limits.ip {
            return Err(Exceeded::Ip);
        }
        c.total += 1;
        *c.per_user.entry(user.into()).or_insert(0) += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// Counts one allocation of `user` from `ip` less.
    pub fn give_back(&self, user: &str, ip: IpAddr) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                c.per_user.remove(user);
            }
        }
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }

    /// Allocations counted in total.
    pub fn total(&self) -> u32 {
        self.counts().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_counts_enforce_each_quota_and_come_back() {
        let a = QuotaBook::default();
        let b = a.clone();
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        let limits = Limits {
            total: 3,
            user: 2,
            ip: 2,
        };
        assert_eq!(a.take("u", ip1, limits), Ok(()));
        assert_eq!(b.take("u", ip2, limits), Ok(()));
        assert_eq!(a.take("u", ip2, limits), Err(Exceeded::User));
        assert_eq!(b.take("v", ip1, limits), Ok(()));
        assert_eq!(a.take("w", ip2, limits), Err(Exceeded::Total));
        b.give_back("u", ip1);
        assert_eq!(a.take("w", ip1, limits), Ok(()));
        assert_eq!(
            a.take("x", ip1, Limits { total: 0, ..limits }),
            Err(Exceeded::Ip)
        );
        for (u, ip) in [("u", ip2), ("v", ip1), ("w", ip1)] {
            a.give_back(u, ip);
        }
        assert_eq!(b.total(), 0);
        assert!(a.counts().per_user.is_empty() && a.counts().per_ip.is_empty());
    }
}
