//! The node loop: every arbor process in a run, at every depth, is a node. Its parent link is
//! the operator's terminal (the initiator) or the stdin/stdout of the SSH exec channel its
//! parent opened (a relay or leaf). It stages its children with one code path (`stage`).

pub mod child;
pub mod parent;
pub mod stage;
