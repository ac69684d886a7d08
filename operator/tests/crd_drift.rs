//! The committed `crds/*.yaml` must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let crds_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, definition) in kubesaga_operator::crd::all() {
        let path = crds_dir.join(format!("{name}.yaml"));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make crds` and commit the result", path.display()));
        let generated = kubesaga_operator::crd::to_yaml(&definition).expect("render CRD");
        assert!(
            committed == generated,
            "{} is out of date with the Rust types in operator/src/crd; run `make crds` and commit the result",
            path.display()
        );
    }
}
