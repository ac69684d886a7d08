//! Custom resource types of the `kubesaga.dev` API group.

pub(crate) mod duration;
mod outbox_relay;
mod saga;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use duration::{Duration, DurationError};
pub use outbox_relay::{
    Backoff, DatabaseRef, Destination, OutboxRelay, OutboxRelaySpec, OutboxRelayStatus, RedisRef, SecretKeyRef,
};
pub use saga::*;

/// The API group of every kubesaga resource.
pub const GROUP: &str = "kubesaga.dev";

/// Every CustomResourceDefinition the operator needs, in the order they are written to `crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![("sagas", Saga::crd()), ("outboxrelays", OutboxRelay::crd())]
}

/// Renders one CRD as the YAML document committed under `crds/<name>.yaml`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

#[cfg(test)]
mod tests {
    use kube::core::crd::merge_crds;

    use super::*;

    #[test]
    fn every_crd_has_one_served_storage_version_with_a_status_subresource() {
        for (name, crd) in all() {
            assert_eq!(crd.spec.group, GROUP, "{name}");
            let versions = &crd.spec.versions;
            assert_eq!(versions.iter().filter(|v| v.storage).count(), 1, "{name}");
            let storage = versions.iter().find(|v| v.storage).expect("storage version");
            assert!(storage.served, "{name}");
            assert!(
                storage.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
                "{name} must write status through the status subresource"
            );
            // merge_crds refuses a set of versions that disagree on names or scope.
            merge_crds(vec![crd.clone()], &storage.name).expect("consistent CRD");
        }
    }
}
