//! Fault injection for the crash tests: `KUBESAGA_FAULT_INJECTION=<point>` makes the process abort when it reaches
//! that point, the way a `SIGKILL` or an OOM kill would stop it. Unset in production, where a point costs one
//! environment lookup.

/// Aborts the process if `KUBESAGA_FAULT_INJECTION` names this point; `name` builds the point's name only when the
/// variable is set.
pub fn point(name: impl FnOnce() -> String) {
    let Ok(wanted) = std::env::var("KUBESAGA_FAULT_INJECTION") else { return };
    let name = name();
    if wanted == name {
        eprintln!("fault injection: {name}: aborting");
        std::process::abort();
    }
}
