//! Solidity ACL contract, its alloy bindings and the ACL reader. Arrives with the Contracts milestone.
