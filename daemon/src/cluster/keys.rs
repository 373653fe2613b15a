//! The keys of a cluster in etcd, all under one prefix (`/indicia` by default):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `<prefix>/appliances/<id>` | the appliance's address | the appliance's |
//! | `<prefix>/vpsds/<vPSD id>/owner` | the owning appliance's id | none: its `mod_revision` is the vPSD's fencing epoch |
//! | `<prefix>/vpsds/<vPSD id>/state` | the vPSD's replicated state | none |
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
    }
}
