//! HAProxy's side: the operations between two desired states (`diff`), the Dataplane API that
//! applies them (`dataplane`), HAProxy's own sockets (`runtime`) and slot changes through them
//! (`live`). Nothing here reads Consul.

pub mod dataplane;
pub mod diff;
pub mod live;
pub mod runtime;
