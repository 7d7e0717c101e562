//! The pool of forwarded queries in flight, with a per-client share: one
//! client asking many distinct names cannot take every slot and turn every
//! other client's forwarded question into SERVFAIL (issue 11, defect 12).
//! A cache hit never takes a slot (the loops ask the forward cache first).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Slots for forwarded queries: `total` at once, at most `share` per client
/// address.
#[derive(Debug)]
pub struct ForwardSlots {
    total: Arc<Semaphore>,
    share: usize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot, held while the forwarded query runs; released on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ForwardSlots>,
    client: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl ForwardSlots {
    pub fn new(total: usize, share: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total)),
            share: share.clamp(1, total.max(1)),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `client`, or `None` when the pool or its share is used up.
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut clients = self.clients();
        let held = clients.entry(client).or_insert(0);
        if *held >= self.share {
            return None;
        }
        let permit = self.total.clone().try_acquire_owned().ok()?;
        *held += 1;
        Some(Slot {
            slots: self.clone(),
            client,
            _permit: permit,
        })
    }

    /// Slots `client` holds now.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.clients().get(&client).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut clients = self.slots.clients();
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_share_and_others_still_get_slots() {
        let slots = ForwardSlots::new(8, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<Slot> = (0..3)
            .map(|_| slots.take(a).expect("within share"))
            .collect();
        assert!(slots.take(a).is_none(), "over its share");
        let mut others: Vec<Slot> = (0..3).map(|_| slots.take(b).unwrap()).collect();
        assert_eq!(slots.held_by(a), 3);
        drop(held);
        assert_eq!(slots.held_by(a), 0, "released on drop");
        others.extend((0..2).map(|_| slots.take(a).unwrap()));
        // 5 of 8 taken by b (3) and a (2): one more for a, two for others,
        // then the pool is used up.
        others.push(slots.take(a).unwrap());
        others.push(slots.take("10.0.0.3".parse().unwrap()).unwrap());
        others.push(slots.take("10.0.0.4".parse().unwrap()).unwrap());
        assert!(
            slots.take("10.0.0.5".parse().unwrap()).is_none(),
            "pool used up"
        );
    }
}
