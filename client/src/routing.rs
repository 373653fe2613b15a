//! A client for a cluster of appliances (docs/CLUSTER.md section 12.4): it learns where
//! each vPSD is from any appliance (`cluster-placement`) and sends each vPSD's requests
//! straight to its owner, over one connection per appliance.
//!
//! A placement it holds may be stale (a vPSD moved, its owner died): the appliance it
//! reaches then forwards the request, or answers `vpsd-moved`, and the client reads the
//! placement again and sends the request once more, **with the same request id**, so that
//! the owner's idempotency window makes the retry safe. Bounded: at most
//! [`ROUTES_MAX`] sends per request.

use std::collections::HashMap;

use indicia_proto::{ErrorCode, Request, Response, VpsdPlacement};

use crate::transport::TlsSettings;
use crate::{Client, ClientError, Credential, RequestIds, Result};

/// The most times one request is sent (to the owner it knows, then after reading the
/// placement again): after `vpsd-moved` or `cluster-unavailable` (not charged), or a lost
/// connection.
pub const ROUTES_MAX: usize = 3;

/// Where vPSDs are: the live appliances (id, address), by id, and the owner of each vPSD
/// asked about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub appliances: Vec<(String, String)>,
    pub vpsds: Vec<VpsdPlacement>,
}

/// A client that routes each request to the appliance that owns its vPSD.
pub struct RoutingClient {
    credential: Credential,
    tls: Option<TlsSettings>,
    /// Addresses to learn placement from when nothing else answers.
    seeds: Vec<String>,
    /// Open connections, by address.
    connections: HashMap<String, Client>,
    /// Each vPSD's owner, by appliance id, as last read.
    owners: HashMap<u64, String>,
    /// Each live appliance's address, as last read.
    addresses: HashMap<String, String>,
    ids: RequestIds,
}

impl std::fmt::Debug for RoutingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingClient")
            .field("seeds", &self.seeds)
            .field("connections", &self.connections.len())
            .field("owners", &self.owners.len())
            .finish_non_exhaustive()
    }
}

impl RoutingClient {
    /// A client of the cluster that `seeds` (appliance addresses) belong to. Nothing is
    /// connected until the first request.
    pub fn new(
        seeds: &[String],
        credential: &Credential,
        tls: Option<&TlsSettings>,
    ) -> Result<Self> {
        Ok(Self {
            credential: credential.clone(),
            tls: tls.cloned(),
            seeds: seeds.to_vec(),
            connections: HashMap::new(),
            owners: HashMap::new(),
            addresses: HashMap::new(),
            ids: RequestIds::random()?,
        })
    }

    /// The connection to `address`, opened if need be.
    fn connection(&mut self, address: &str) -> Result<&mut Client> {
        if !self.connections.contains_key(address) {
            let client = Client::connect_with(address, &self.credential, self.tls.as_ref())?;
            self.connections.insert(address.to_owned(), client);
        }
        self.connections.get_mut(address).ok_or(ClientError::Closed)
    }

    /// Asks any appliance (the known ones first, then the seeds) where these vPSDs are,
    /// and remembers it.
    pub fn refresh(&mut self, vpsd_ids: &[u64]) -> Result<Placement> {
        let mut candidates: Vec<String> = self.addresses.values().cloned().collect();
        candidates.sort();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last_error = ClientError::Closed;
        for address in candidates {
            let answer = self
                .connection(&address)
                .and_then(|client| client.placement(vpsd_ids));
            match answer {
                Ok(placement) => {
                    self.learn(&placement);
                    return Ok(placement);
                }
                // Every appliance would say the same.
                Err(ClientError::Refused(body))
                    if matches!(body.code, ErrorCode::Forbidden | ErrorCode::InvalidArgument) =>
                {
                    return Err(ClientError::Refused(body))
                }
                // This one cannot read etcd now (cut off): another may.
                Err(err @ ClientError::Refused(_)) => last_error = err,
                Err(err) => {
                    self.connections.remove(&address);
                    last_error = err;
                }
            }
        }
        Err(last_error)
    }

    fn learn(&mut self, placement: &Placement) {
        self.addresses = placement.appliances.iter().cloned().collect();
        for vpsd in &placement.vpsds {
            if vpsd.owned && !vpsd.appliance.is_empty() {
                self.owners.insert(vpsd.vpsd_id, vpsd.appliance.clone());
            } else {
                self.owners.remove(&vpsd.vpsd_id);
            }
        }
    }

    /// Where a request goes: its vPSD's owner if known and live, else any appliance.
    fn address_for(&mut self, vpsd_id: Option<u64>) -> Result<String> {
        if let Some(vpsd_id) = vpsd_id {
            if !self.owners.contains_key(&vpsd_id) {
                // Unknown yet: ask. A vPSD nobody owns (a provision's) goes where placement
                // would put it.
                let placement = self.refresh(&[vpsd_id])?;
                if let Some(address) = placement
                    .vpsds
                    .first()
                    .and_then(|placed| self.addresses.get(&placed.appliance))
                {
                    return Ok(address.clone());
                }
            }
            if let Some(address) = self
                .owners
                .get(&vpsd_id)
                .and_then(|owner| self.addresses.get(owner))
            {
                return Ok(address.clone());
            }
        }
        let mut known: Vec<&String> = self.addresses.values().collect();
        known.sort();
        known
            .first()
            .map(|address| (*address).clone())
            .or_else(|| self.seeds.first().cloned())
            .ok_or_else(|| ClientError::Protocol("no appliance to send to".into()))
    }

    /// The owner of a vPSD, as this client last read it.
    pub fn owner_of(&self, vpsd_id: u64) -> Option<&str> {
        self.owners.get(&vpsd_id).map(String::as_str)
    }

    /// Sends a request to the appliance that owns its vPSD and returns the answer. On
    /// `vpsd-moved`, `cluster-unavailable` (not charged) or a lost connection it reads the
    /// placement again and sends the same request (same id) once more, at most
    /// [`ROUTES_MAX`] times in all.
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        let request_id = self.ids.next_id();
        self.call_with_id(request_id, request)
    }

    /// [`RoutingClient::call`] with the caller's request id (a retry of its own).
    pub fn call_with_id(&mut self, request_id: u64, request: &Request) -> Result<Response> {
        let vpsd_id = request.vpsd_id();
        let mut last = ClientError::Closed;
        for _ in 0..ROUTES_MAX {
            let address = self.address_for(vpsd_id)?;
            let answer = self
                .connection(&address)
                .and_then(|client| client.call_with_id(request_id, request));
            match answer {
                // Not charged there: send it again to the owner read anew.
                Ok(Response::Error(body))
                    if matches!(
                        body.code,
                        ErrorCode::VpsdMoved | ErrorCode::ClusterUnavailable
                    ) =>
                {
                    last = ClientError::Refused(body);
                }
                // May have been carried out: the caller retries it with its id; the owner
                // is read anew then (the appliance answering this one may be cut off).
                Ok(Response::Error(body))
                    if matches!(
                        body.code,
                        ErrorCode::OutcomeUnknown | ErrorCode::ForwardFailed
                    ) =>
                {
                    if let Some(vpsd_id) = vpsd_id {
                        self.owners.remove(&vpsd_id);
                    }
                    return Ok(Response::Error(body));
                }
                Ok(response) => return Ok(response),
                Err(err @ (ClientError::Io(_) | ClientError::Closed | ClientError::Tls(_))) => {
                    // The appliance is gone, or the connection is: another may own the vPSD.
                    self.connections.remove(&address);
                    last = err;
                }
                Err(err) => return Err(err),
            }
            if let Some(vpsd_id) = vpsd_id {
                self.owners.remove(&vpsd_id);
            }
        }
        match last {
            ClientError::Refused(body) => Ok(Response::Error(body)),
            err => Err(err),
        }
    }
}
