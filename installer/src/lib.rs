//! `podvisor-install`'s logic: the containerd config edit (`containerd`),
//! the node's files (`node`) and restarting containerd (`restart`).
//! `main.rs` adds labelling the node.

pub mod containerd;
pub mod node;
pub mod restart;
