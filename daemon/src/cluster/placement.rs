//! Where a vPSD belongs, sans-io: the live appliances, those an operator drains, and the
//! operator's pins, as etcd holds them; and the rule that turns them into one appliance
//! per vPSD (docs/CLUSTER.md section 12).
//!
//! The rule, in order:
//! 1. a pin of the vPSD itself, if its appliance is live and not draining;
//! 2. a pin of the vPSD's owner (customer) account, likewise;
//! 3. with rebalancing on, rendezvous hashing over the live appliances that are not
//!    draining (all live ones, if every one drains): the same answer as a takeover's
//!    successor ([`super::successor`]), so that a takeover never fights the placement;
//! 4. with rebalancing off, wherever the vPSD is (or is being provisioned), unless that
//!    appliance drains: then as 3.
//!
//! A placement is only advice. Who owns a vPSD is its owner key, changed only by the
//! fenced transactions of step 2 (a claim, a handover): a placement read a moment ago
//! that is wrong now costs a forward that is answered `vpsd-moved` and routed again,
//! never a double charge.

use std::collections::{BTreeMap, BTreeSet};

use super::successor;

/// The most pins of each kind one placement holds; more are ignored (with a warning at
/// the read), so that a placement's size stays bounded.
pub const PINS_MAX: usize = 65_536;

/// A snapshot of what placement is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The live appliances (id, address), by id.
    pub live: Vec<(String, String)>,
    /// Appliances an operator drains.
    pub draining: BTreeSet<String>,
    pub vpsd_pins: BTreeMap<u64, String>,
    /// Pins of owner (customer) accounts.
    pub owner_pins: BTreeMap<String, String>,
    /// Whether vPSDs go where rendezvous hashing puts them (`[cluster] rebalance`).
    pub rebalance: bool,
    /// etcd's revision when it was read (at least): a change made after it (a pin, a
    /// handover) may be missing from it.
    pub revision: i64,
}

impl Placement {
    /// Whether `other` places every vPSD as this one does (the same live appliances,
    /// drains, pins and rule; the revision it was read at aside).
    pub fn same_layout(&self, other: &Self) -> bool {
        self.live == other.live
            && self.draining == other.draining
            && self.vpsd_pins == other.vpsd_pins
            && self.owner_pins == other.owner_pins
            && self.rebalance == other.rebalance
    }

    /// Whether `appliance` is live.
    pub fn is_live(&self, appliance: &str) -> bool {
        self.live.iter().any(|(id, _)| id == appliance)
    }

    /// Where a live appliance is reached.
    pub fn address(&self, appliance: &str) -> Option<&str> {
        self.live
            .iter()
            .find(|(id, _)| id == appliance)
            .map(|(_, address)| address.as_str())
    }

    /// Whether `appliance` may be given vPSDs: live, and not draining.
    pub fn takes_vpsds(&self, appliance: &str) -> bool {
        self.is_live(appliance) && !self.draining.contains(appliance)
    }

    /// The appliance `vpsd_id` belongs on: see the module's rule. `owner` is its owner
    /// account, `now` the appliance that has it (or would provision it). None when no
    /// appliance is live.
    pub fn place<'a>(&'a self, vpsd_id: u64, owner: Option<&str>, now: &'a str) -> Option<&'a str> {
        let pinned = self
            .vpsd_pins
            .get(&vpsd_id)
            .or_else(|| owner.and_then(|owner| self.owner_pins.get(owner)));
        if let Some(pinned) = pinned.filter(|pinned| self.takes_vpsds(pinned)) {
            return Some(pinned);
        }
        if !self.rebalance && self.takes_vpsds(now) {
            return Some(now);
        }
        let open: Vec<String> = self
            .live
            .iter()
            .filter(|(id, _)| !self.draining.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        let candidates = if open.is_empty() {
            self.live.iter().map(|(id, _)| id.clone()).collect()
        } else {
            open
        };
        let chosen = successor(vpsd_id, &candidates)?.to_owned();
        self.live
            .iter()
            .find(|(id, _)| *id == chosen)
            .map(|(id, _)| id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(rebalance: bool) -> Placement {
        Placement {
            live: ["a1", "a2", "a3"]
                .map(|id| (id.to_owned(), format!("{id}:7450")))
                .to_vec(),
            rebalance,
            ..Placement::default()
        }
    }

    #[test]
    fn rendezvous_spreads_and_agrees_with_the_takeover_successor() {
        let placement = placement(true);
        let live: Vec<String> = placement.live.iter().map(|(id, _)| id.clone()).collect();
        let mut counts = BTreeMap::new();
        for vpsd in 0..3000u64 {
            let placed = placement.place(vpsd, None, "a1").unwrap();
            assert_eq!(Some(placed), successor(vpsd, &live));
            *counts.entry(placed).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&count| count > 800), "{counts:?}");
    }

    #[test]
    fn pins_win_while_their_appliance_takes_vpsds() {
        let mut placement = placement(true);
        placement.owner_pins.insert("acme".into(), "a2".into());
        placement.vpsd_pins.insert(7, "a3".into());
        for vpsd in 0..100 {
            let placed = placement.place(vpsd, Some("acme"), "a1");
            assert_eq!(placed, Some(if vpsd == 7 { "a3" } else { "a2" }));
        }
        // A pin to a draining or dead appliance does not hold.
        placement.draining.insert("a3".into());
        assert_eq!(placement.place(7, Some("acme"), "a1"), Some("a2"));
        placement.live.retain(|(id, _)| id != "a2");
        let placed = placement.place(7, Some("acme"), "a1").unwrap();
        assert_eq!(placed, "a1");
    }

    #[test]
    fn draining_appliances_are_given_nothing_unless_all_drain() {
        let mut placement = placement(true);
        placement.draining.insert("a2".into());
        for vpsd in 0..500 {
            assert_ne!(placement.place(vpsd, None, "a2"), Some("a2"));
        }
        placement.draining.extend(["a1".into(), "a3".into()]);
        assert!(placement.place(1, None, "a1").is_some());
        assert_eq!(Placement::default().place(1, None, "a1"), None);
    }

    #[test]
    fn without_rebalancing_a_vpsd_stays_unless_its_appliance_drains() {
        let mut placement = placement(false);
        for vpsd in 0..100 {
            assert_eq!(placement.place(vpsd, None, "a2"), Some("a2"));
        }
        placement.draining.insert("a2".into());
        for vpsd in 0..100 {
            let placed = placement.place(vpsd, None, "a2").unwrap();
            assert!(placed == "a1" || placed == "a3");
        }
        assert!(placement
            .address("a3")
            .is_some_and(|address| address == "a3:7450"));
    }
}
