//! alloy bindings generated at compile time from the committed artifact.

/// The committed compiler output (`artifacts/VeilAcl.json`): ABI, creation and runtime bytecode,
/// compiler version and settings.
pub const ARTIFACT_JSON: &str = include_str!("../artifacts/VeilAcl.json");

alloy::sol!(
    /// The Veil ACL contract (`sol/VeilAcl.sol`), bound from its compiled artifact.
    ///
    /// `VeilAcl::deploy`, `VeilAcl::new(address, provider)` and the call builders come from
    /// alloy's `sol!`; [`VeilAcl::VeilAclErrors`] holds every custom error and
    /// [`VeilAcl::VeilAclEvents`] every event.
    #[allow(missing_docs, clippy::too_many_arguments)]
    #[sol(rpc, all_derives)]
    VeilAcl,
    "artifacts/VeilAcl.json"
);
