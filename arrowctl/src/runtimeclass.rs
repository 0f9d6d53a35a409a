//! `arrow runtimeclass`: the Kubernetes RuntimeClass for Arrow's pods.
//!
//! The `overhead` is what a pod's VM may use beyond its containers' limits
//! (README, "Overhead"): guest RAM rounded up above the pod's limit (64 to
//! 191 MiB by the sizing rule) plus the VMM's own few MiB, so 208Mi covers
//! the worst case and kubelet's scheduling and eviction see the whole VM.
//! The same text is in `deploy/runtimeclass.yaml`.

/// The manifest, ready for `kubectl apply -f -`.
pub const MANIFEST: &str = include_str!("../../deploy/runtimeclass.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_handler_and_overhead() {
        assert!(MANIFEST.contains("kind: RuntimeClass"));
        assert!(MANIFEST.contains("handler: arrow"));
        assert!(MANIFEST.contains("memory: \"208Mi\""));
        assert!(MANIFEST.contains(crate::containerd_config::HANDLER));
    }
}
