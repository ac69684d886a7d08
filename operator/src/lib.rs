//! The kubesaga operator: custom resource types and the controllers that drive them.
//!
//! - [`crd`] holds the `Saga` and `OutboxRelay` resource types; the CRD manifests in `crds/` are generated from
//!   them (`make crds`), never edited by hand.

pub mod crd;
