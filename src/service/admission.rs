//! Admission: the global cap on requests in flight, counted only for requests that are
//! complete (their body has arrived) and authenticated, and shared fairly between callers.
//!
//! A request takes a [`Ticket`] right after its caller is authenticated (see `call::Call`) and
//! gives it back when the call ends. So a client that opens streams and never finishes their
//! bodies, or that sends no valid credential, holds no ticket and cannot starve anyone
//! (issue 13); such streams are bounded per connection and by the body deadline instead (see
//! `guard`).
//!
//! **Fair shares.** One caller must not be able to take every ticket either: a caller may hold
//! more than its fair share (`cap / callers holding tickets`, counting itself and at least
//! two, and at least 1) only while more than
//! a reserve of a quarter of the cap stays free. A caller that floods the server is therefore
//! held to three quarters of the cap, and every other caller below its fair share still finds
//! a free ticket in the reserve. Refusals are immediate (RESOURCE_EXHAUSTED with retry info),
//! never queued, for the reasons the guard's docs give.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The shared admission counter (one per server).
pub struct Admission {
    cap: usize,
    reserve: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    /// Tickets held per caller. Keyed by authenticated callers' audit names (tokens and
    /// certificate identities the operator issued: not chosen by an anonymous client), so a
    /// fast seeded hash; a key is shared with the tickets that hold it, not copied per call.
    per_caller: HashMap<Arc<str>, usize, foldhash::fast::RandomState>,
}

/// Why a request was not admitted: the message the caller hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl Admission {
    /// An admission counter for at most `cap` requests in flight (at least 1).
    pub fn new(cap: usize) -> Arc<Self> {
        let cap = cap.max(1);
        Arc::new(Self {
            cap,
            reserve: cap / 4,
            held: Mutex::new(Held::default()),
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Admits one request of `caller` (its audit name), or refuses it at once. The returned
    /// ticket holds the place until it is dropped.
    pub fn admit(self: &Arc<Self>, caller: &str) -> Result<Ticket, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.cap {
            return Err(Refused(format!(
                "the server is at its limit of {} concurrent requests",
                self.cap
            )));
        }
        let mine = held.per_caller.get(caller).copied().unwrap_or(0);
        // At least two: a lone caller is held to half before it may dip into the reserve,
        // so a caller arriving next always finds it.
        let callers = (held.per_caller.len() + usize::from(mine == 0)).max(2);
        let fair_share = (self.cap / callers).max(1);
        let free = self.cap - held.total;
        if mine >= fair_share && free <= self.reserve {
            return Err(Refused(format!(
                "this caller already has {mine} requests in flight, its share of the server's \
                 limit of {} while others wait",
                self.cap
            )));
        }
        held.total += 1;
        let caller = match held.per_caller.get_key_value(caller) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(caller),
        };
        *held.per_caller.entry(Arc::clone(&caller)).or_insert(0) += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            caller,
        })
    }

    /// Requests in flight now (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One admitted request's place; dropping it frees the place.
pub struct Ticket {
    admission: Arc<Admission>,
    caller: Arc<str>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self
            .admission
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.per_caller.get_mut(&*self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.per_caller.remove(&*self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_cannot_take_the_reserve() {
        let admission = Admission::new(8);
        let hog: Vec<_> = (0..8).map_while(|_| admission.admit("hog").ok()).collect();
        assert_eq!(hog.len(), 6, "held to cap minus the reserve of 8/4");
        assert!(admission.admit("hog").is_err());
        let other: Vec<_> = (0..2).map(|_| admission.admit("other").unwrap()).collect();
        assert_eq!(admission.in_flight(), 8);
        assert!(admission.admit("third").is_err(), "the cap still holds");
        drop(other);
        drop(hog);
        assert_eq!(admission.in_flight(), 0);
        let again: Vec<_> = (0..8).map_while(|_| admission.admit("a").ok()).collect();
        assert_eq!(again.len(), 6, "places come back when tickets drop");
    }

    #[test]
    fn callers_below_their_share_use_the_reserve() {
        let admission = Admission::new(8);
        let _a: Vec<_> = (0..3).map(|_| admission.admit("a").unwrap()).collect();
        let _b: Vec<_> = (0..3).map(|_| admission.admit("b").unwrap()).collect();
        // Only the reserve (2) is free; a newcomer's share is 8/3 = 2, so it may use it.
        let _c = admission.admit("c").unwrap();
        assert!(admission.admit("c").is_ok());
        assert!(admission.admit("a").is_err(), "the cap is reached");
    }

    #[test]
    fn cap_of_one() {
        let admission = Admission::new(1);
        let ticket = admission.admit("a").unwrap();
        assert!(admission.admit("b").is_err());
        drop(ticket);
        assert!(admission.admit("b").is_ok());
    }
}
