//! The provider's side of an authorization: signing one. The appliance only verifies
//! (`Engine::prepare_provider`); this is for the provider's tools and for tests.

use aws_lc_rs::signature::Ed25519KeyPair;
use indicia_proto::ProviderAuthorization;

/// Returns `authorization` with its signature made by the provider's key over
/// [`ProviderAuthorization::signed_bytes`].
pub fn sign_authorization(
    provider: &Ed25519KeyPair,
    mut authorization: ProviderAuthorization,
) -> ProviderAuthorization {
    let signature = provider.sign(&authorization.signed_bytes());
    authorization.signature.copy_from_slice(signature.as_ref());
    authorization
}

/// Builds and signs an authorization: what the provider's tool issues.
pub fn authorize(
    provider: &Ed25519KeyPair,
    kind: indicia_proto::AuthorizationKind,
    vpsd_id: u64,
    amount_mills: u64,
    sequence: u64,
    expires_unix: u64,
) -> ProviderAuthorization {
    sign_authorization(
        provider,
        ProviderAuthorization {
            kind,
            vpsd_id,
            amount_mills,
            sequence,
            expires_unix,
            signature: [0; 64],
        },
    )
}
