//! The relay port pool: the ports of `min-port..=max-port`, handed out in random order
//! (RFC 8656 7.2 asks for unpredictable relayed ports) and returned to the back of the queue
//! when freed, so that a port just released is the last to be reused.

use std::collections::VecDeque;

use super::Rng;

#[derive(Debug)]
pub struct PortPool {
    min: u16,
    max: u16,
    /// Candidates in hand-out order. May hold ports that are in use (taken out of order by
    /// [`PortPool::take_specific`]); those are skipped when popped.
    queue: VecDeque<u16>,
    in_use: Vec<bool>,
    used: usize,
}

impl PortPool {
    pub fn new(min: u16, max: u16, rng: &mut Rng) -> Self {
        let mut ports: Vec<u16> = (min..=max).collect();
        // Fisher-Yates.
        for i in (1..ports.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            ports.swap(i, j);
        }
        PortPool {
            min,
            max,
            in_use: vec![false; ports.len()],
            queue: ports.into(),
            used: 0,
        }
    }

    fn idx(&self, port: u16) -> Option<usize> {
        (self.min..=self.max)
            .contains(&port)
            .then(|| (port - self.min) as usize)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.idx(port).is_some()
    }

    pub fn capacity(&self) -> usize {
        self.in_use.len()
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn is_free(&self, port: u16) -> bool {
        self.idx(port).is_some_and(|i| !self.in_use[i])
    }

    fn mark(&mut self, port: u16) {
        if let Some(i) = self.idx(port) {
            debug_assert!(!self.in_use[i]);
            self.in_use[i] = true;
            self.used += 1;
        }
    }

    /// Takes the next free port.
    pub fn take(&mut self) -> Option<u16> {
        while let Some(p) = self.queue.pop_front() {
            if self.is_free(p) {
                self.mark(p);
                return Some(p);
            }
        }
        None
    }

    /// Takes a given port if it is free.
    pub fn take_specific(&mut self, port: u16) -> bool {
        if self.is_free(port) {
            self.mark(port);
            true
        } else {
            false
        }
    }

    /// Takes the first even port in hand-out order whose successor is free too, and takes
    /// the successor as well when `pair` is set (EVEN-PORT with R, RFC 8656 7.2).
    pub fn take_even(&mut self, pair: bool) -> Option<u16> {
        let pos = self.queue.iter().position(|&p| {
            p % 2 == 0
                && self.is_free(p)
                && (!pair || p.checked_add(1).is_some_and(|q| self.is_free(q)))
        })?;
        let p = self.queue.remove(pos)?;
        self.mark(p);
        if pair {
            self.mark(p + 1);
        }
        Some(p)
    }

    /// Returns a port to the back of the queue.
    pub fn release(&mut self, port: u16) {
        if let Some(i) = self.idx(port)
            && self.in_use[i]
        {
            self.in_use[i] = false;
            self.used -= 1;
            self.queue.push_back(port);
            // Ports taken out of order leave stale entries behind; keep the queue bounded.
            if self.queue.len() > 2 * self.in_use.len() {
                let in_use = &self.in_use;
                let min = self.min;
                self.queue.retain(|&p| !in_use[(p - min) as usize]);
                let mut seen = vec![false; in_use.len()];
                self.queue.retain(|&p| {
                    let i = (p - min) as usize;
                    !std::mem::replace(&mut seen[i], true)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_port_once_then_reuses_released() {
        let mut rng = Rng::new(1);
        let mut pool = PortPool::new(50000, 50009, &mut rng);
        let mut got: Vec<u16> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(pool.used(), 10);
        got.sort();
        assert_eq!(got, (50000..=50009).collect::<Vec<_>>());
        assert_eq!(pool.take(), None);
        pool.release(50004);
        pool.release(50004);
        assert_eq!(pool.used(), 9);
        assert_eq!(pool.take(), Some(50004));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn even_pairs_and_specific_ports() {
        let mut rng = Rng::new(2);
        let mut pool = PortPool::new(50000, 50003, &mut rng);
        let p = pool.take_even(true).unwrap();
        assert_eq!(p % 2, 0);
        assert!(!pool.is_free(p) && !pool.is_free(p + 1));
        let q = pool.take_even(true).unwrap();
        assert_ne!(p, q);
        assert_eq!(pool.take_even(false), None);
        pool.release(p + 1);
        assert!(pool.take_specific(p + 1));
        assert!(!pool.take_specific(p + 1));
        assert!(!pool.take_specific(40000));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn queue_stays_bounded_under_out_of_order_takes() {
        let mut rng = Rng::new(3);
        let mut pool = PortPool::new(50000, 50001, &mut rng);
        for _ in 0..100 {
            assert!(pool.take_specific(50000));
            pool.release(50000);
        }
        assert!(pool.queue.len() <= 4);
        assert!(pool.take().is_some() && pool.take().is_some());
        assert_eq!(pool.take(), None);
    }
}
