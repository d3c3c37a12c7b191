//! `podvisor-install`'s logic: the containerd config edit (`containerd`) and
//! the node's files (`node`). `main.rs` adds restarting containerd and
//! labelling the node.

pub mod containerd;
pub mod node;
