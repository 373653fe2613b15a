//! The keys of a cluster in etcd, all under one prefix (`/indicia` by default):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `<prefix>/appliances/<id>` | the appliance's address | the appliance's |
//! | `<prefix>/vpsds/<vPSD id>/owner` | the owning appliance's id | none: its `mod_revision` is the vPSD's fencing epoch |
//! | `<prefix>/vpsds/<vPSD id>/state` | the vPSD's replicated state | none |
//! | `<prefix>/vpsds/<vPSD id>/keys` | the vPSD's sealed keys | none |
//! | `<prefix>/members/<id>` | the appliance's address when it joined: it joined once (for the takeover sweep) | none |
//! | `<prefix>/owners/<id>/<vPSD id>` | empty: an index of who owns what, kept with the owner keys | none |
//! | `<prefix>/cluster/master-check` | a check value of the cluster master key | none |
//!
//! vPSD ids are written in decimal, zero-padded to 20 digits, so that keys sort by id.

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is dropped).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// Where an appliance announces itself (under its lease).
    pub fn appliance(&self, appliance: &str) -> String {
        format!("{}/appliances/{appliance}", self.prefix)
    }

    /// The prefix of every appliance key.
    pub fn appliances(&self) -> String {
        format!("{}/appliances/", self.prefix)
    }

    /// A vPSD's owner key.
    pub fn owner(&self, vpsd_id: u64) -> String {
        format!("{}/vpsds/{vpsd_id:020}/owner", self.prefix)
    }

    /// A vPSD's state key.
    pub fn state(&self, vpsd_id: u64) -> String {
        format!("{}/vpsds/{vpsd_id:020}/state", self.prefix)
    }

    /// A vPSD's sealed keys.
    pub fn keys(&self, vpsd_id: u64) -> String {
        format!("{}/vpsds/{vpsd_id:020}/keys", self.prefix)
    }

    /// Where an appliance is recorded as having joined (no lease).
    pub fn member(&self, appliance: &str) -> String {
        format!("{}/members/{appliance}", self.prefix)
    }

    /// The prefix of every member key.
    pub fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    /// The index entry saying that `appliance` owns `vpsd_id`.
    pub fn owned(&self, appliance: &str, vpsd_id: u64) -> String {
        format!("{}/owners/{appliance}/{vpsd_id:020}", self.prefix)
    }

    /// The prefix of the index entries of what `appliance` owns.
    pub fn owned_by(&self, appliance: &str) -> String {
        format!("{}/owners/{appliance}/", self.prefix)
    }

    /// The vPSD id an index entry under [`Keys::owned_by`] names.
    pub fn owned_id(&self, appliance: &str, key: &str) -> Option<u64> {
        key.strip_prefix(&self.owned_by(appliance))?.parse().ok()
    }

    /// An appliance marked draining by an operator (its vPSDs move away).
    pub fn draining(&self, appliance: &str) -> String {
        format!("{}/draining/{appliance}", self.prefix)
    }

    pub fn drainings(&self) -> String {
        format!("{}/draining/", self.prefix)
    }

    /// A vPSD pinned to an appliance (the value names it).
    pub fn pin_vpsd(&self, vpsd_id: u64) -> String {
        format!("{}/pins/vpsds/{vpsd_id:020}", self.prefix)
    }

    pub fn pins_vpsd(&self) -> String {
        format!("{}/pins/vpsds/", self.prefix)
    }

    /// Every vPSD of an owner (customer) account pinned to an appliance; the account name
    /// is hex-encoded, so that any name makes one key.
    pub fn pin_owner(&self, owner: &str) -> String {
        format!(
            "{}/pins/owners/{}",
            self.prefix,
            hex::encode(owner.as_bytes())
        )
    }

    pub fn pins_owner(&self) -> String {
        format!("{}/pins/owners/", self.prefix)
    }

    /// The account name of an owner pin's key.
    pub fn pinned_owner(&self, key: &str) -> Option<String> {
        let bytes = hex::decode(key.strip_prefix(&self.pins_owner())?).ok()?;
        String::from_utf8(bytes).ok()
    }

    /// The check value of the cluster master key.
    pub fn master_check(&self) -> String {
        format!("{}/cluster/master-check", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_vpsd_and_keep_the_prefix() {
        let keys = Keys::new("/indicia/");
        assert_eq!(keys.appliance("a1"), "/indicia/appliances/a1");
        assert_eq!(keys.owner(7), "/indicia/vpsds/00000000000000000007/owner");
        assert_eq!(keys.state(7), "/indicia/vpsds/00000000000000000007/state");
        assert!(keys.owner(9) < keys.owner(10));
        assert!(keys.appliance("a1").starts_with(&keys.appliances()));
        assert_eq!(keys.keys(7), "/indicia/vpsds/00000000000000000007/keys");
        assert!(keys.member("a1").starts_with(&keys.members()));
        let entry = keys.owned("a1", 42);
        assert!(entry.starts_with(&keys.owned_by("a1")));
        assert_eq!(keys.owned_id("a1", &entry), Some(42));
        assert_eq!(keys.owned_id("a2", &entry), None);
        assert_eq!(keys.draining("a3"), "/indicia/draining/a3");
        assert!(keys.pin_vpsd(7).starts_with(&keys.pins_vpsd()));
        let pin = keys.pin_owner("acme/east");
        assert_eq!(pin, "/indicia/pins/owners/61636d652f65617374");
        assert_eq!(keys.pinned_owner(&pin).as_deref(), Some("acme/east"));
        assert_eq!(keys.pinned_owner(&keys.pin_vpsd(7)), None);
    }
}
