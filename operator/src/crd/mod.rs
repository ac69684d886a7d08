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
    vec![
        ("sagas", without_unsigned_formats(Saga::crd())),
        ("outboxrelays", without_unsigned_formats(OutboxRelay::crd())),
    ]
}

/// schemars marks unsigned integers `format: uint32` (or `uint16`, …), which the API server does not know and warns
/// about on every apply. Every such field here carries its own `minimum`, so the format adds nothing: drop it.
fn without_unsigned_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("uint")) {
                    map.remove("format");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    strip(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
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
            let text = serde_json::to_string(&crd).expect("json");
            assert!(!text.contains("\"format\":\"uint"), "{name}: the API server warns about unsigned formats");
        }
    }
}
